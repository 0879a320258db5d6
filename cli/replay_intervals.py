"""What ``rooflab replay --interval`` prints: per run and statistic the median over the posterior draws with its
interval (and the point estimate's replay and the measurement), the probability each ``--slo`` holds, and which
sources of uncertainty the interval covers and which it does not (:mod:`rooflab.replay.intervals`)."""

from __future__ import annotations

from rooflab.replay.intervals import KEYS, IntervalReplay


def _ms(v: float | None) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:.1f}" if abs(v) < 1e4 else f"{v:.4g}"


def interval_table(results: dict[str, IntervalReplay]) -> str:
    """One row per run and statistic: median [lower, upper] ms, point, measured, covered."""
    if not results:
        return ""
    level = next(iter(results.values())).level
    header = ["run", "statistic", f"median [{level:.0%} interval] ms", "point ms", "measured ms", "covered"]
    rows = []
    for run, r in results.items():
        for k in KEYS:
            iv = r.intervals.get(k)
            if iv is None:
                continue
            cov = "-" if iv.covered is None else ("yes" if iv.covered else "NO")
            rows.append([str(run), k, f"{_ms(iv.median_ms)} [{_ms(iv.lower_ms)}, {_ms(iv.upper_ms)}]",
                         _ms(iv.point_ms), _ms(iv.measured_ms), cov])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
                     for r in [header, ["-" * w for w in widths], *rows])


def interval_notes(results: dict[str, IntervalReplay]) -> list[str]:
    """SLO probabilities per run, then what the interval covers and does not (same for every run)."""
    lines = []
    for run, r in results.items():
        for s in r.slos:
            lines.append(f"SLO {s.slo} on {run}: holds with probability {s.probability:.0%} over {r.n_draws} draws "
                         f"(point estimate: {'holds' if s.point_holds else 'fails'})")
    if results:
        r = next(iter(results.values()))
        lines.append(f"interval: {r.level:.0%} central interval over {r.n_draws} posterior draws (seed {r.seed}, "
                     "common random numbers: every draw replays the same arrivals)")
        lines += [f"covers: {c}" for c in r.covers]
        lines += [f"does not cover: {c}" for c in r.not_covered]
    return lines
