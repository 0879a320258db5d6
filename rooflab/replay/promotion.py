"""The rule that decides whether a refit (the *challenger*) replaces the registered *champion* (issue 18). Pure: it
sees only per-run held-out errors; the MLflow registry (``tracking/registry.py``) applies it.

**The error of a coefficient set on a held-out run** is the mean over TTFT, ITL and E2E of the APE of the run's
mean (:func:`rooflab.replay.metrics.compare`, ``mean_ape``) — the request-level accuracy of the replay, the
figure the README's held-out tables report.

**The rule.** Both sets replay the *same* held-out runs (same traces, same scheduler, same engine seed), so the
comparison is paired: d_r = error(challenger, r) − error(champion, r). The mean difference d̄ gets a percentile
bootstrap confidence interval over runs (``level``, default 90%, 2,000 resamples, fixed seed). The challenger is

* **promoted** when the interval's lower bound is ≤ ``tolerance``: the data do not show it worse than the champion
  beyond the noise of the comparison — it may be better, equal, or worse by less than the runs disagree with each
  other (or by less than the tolerance);
* **refused** when the lower bound is > ``tolerance``: worse on the held-out runs, consistently enough that the
  run-to-run noise does not explain it, and by more than the tolerance.

``tolerance`` (default 0.005: half a point of APE) is the materiality floor: a refit that adds runs moves the
coefficients a little and can be *consistently* but immaterially worse on a few held-out runs (the twin test: +0.24
points on all three, interval [+0.10, +0.39]); refusing it would freeze the champion on less data. Set it to 0 for
the strict rule.

With no champion the challenger is promoted (there is nothing to beat); with a champion but no held-out run that
both sets could replay it is refused (nothing shows it is not worse). With one held-out run the interval is that
run's difference. The decision, the rule's parameters and the before/after table go with the registered version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from rooflab.data.traces import Trace
from rooflab.model.coefficients import Coefficients
from rooflab.replay.metrics import METRICS, compare
from rooflab.replay.predict import replay

PROMOTE = "promoted"
REFUSE = "refused"


def run_error(comparison: Mapping[str, Any], stat: str = "mean_ape") -> float:
    """Mean over TTFT, ITL, E2E of ``stat`` of one :func:`rooflab.replay.metrics.compare` result (NaN if none)."""
    vals = [float((comparison.get(m) or {}).get(stat, np.nan)) for m in METRICS]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


@dataclass(frozen=True)
class PromotionRule:
    level: float = 0.90  # confidence of the bootstrap interval of the mean paired difference
    tolerance: float = 0.005  # how much worse (absolute error; 0.005 = half a point of APE) is immaterial
    n_boot: int = 2000
    seed: int = 0

    def describe(self) -> str:
        return (f"promote unless the {self.level:.0%} bootstrap interval (over held-out runs, {self.n_boot} "
                f"resamples) of mean(challenger error − champion error) lies entirely above {self.tolerance:g}; "
                "error = mean over TTFT/ITL/E2E of the APE of the run's mean")


@dataclass
class Decision:
    promote: bool
    reason: str
    rule: str
    n_runs: int
    mean_difference: float  # challenger − champion (negative: the challenger is better)
    ci: tuple[float, float]
    table: pd.DataFrame  # run, champion, challenger, difference

    @property
    def verdict(self) -> str:
        return PROMOTE if self.promote else REFUSE

    def to_dict(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return float(v) if np.isfinite(v) else None

        return {"decision": self.verdict, "reason": self.reason, "rule": self.rule, "n_runs": self.n_runs,
                "mean_difference": num(self.mean_difference), "ci": [num(self.ci[0]), num(self.ci[1])],
                "table": [{k: (num(v) if isinstance(v, float) else v) for k, v in row.items()}
                          for row in self.table.to_dict(orient="records")]}

    def markdown(self) -> str:
        """The before/after table (errors in %) and the decision, as Markdown."""
        def pct(v: Any) -> str:
            return "–" if v is None or not np.isfinite(v) else f"{100 * v:.2f}%"

        lines = ["| held-out run | champion (before) | challenger (after) | difference |", "|---|---|---|---|"]
        for r in self.table.itertuples():
            lines.append(f"| {r.run} | {pct(r.champion)} | {pct(r.challenger)} | {pct(r.difference)} |")
        lines += ["", f"**{self.verdict}**: {self.reason}", "", f"rule: {self.rule}"]
        return "\n".join(lines) + "\n"


def decide(champion: Mapping[str, float] | None, challenger: Mapping[str, float],
           rule: PromotionRule = PromotionRule()) -> Decision:
    """Apply the rule (module docstring) to per-run held-out errors (run -> error) of both sets."""
    runs = sorted(challenger)
    empty = (float("nan"), float("nan"))
    if champion is None:
        table = pd.DataFrame({"run": runs, "champion": np.nan, "challenger": [challenger[r] for r in runs],
                              "difference": np.nan})
        return Decision(True, "no champion yet: the first calibration of this scope becomes the champion",
                        rule.describe(), 0, float("nan"), empty, table)
    both = [r for r in runs if r in champion and np.isfinite(champion[r]) and np.isfinite(challenger[r])]
    table = pd.DataFrame({"run": both, "champion": [champion[r] for r in both],
                          "challenger": [challenger[r] for r in both]})
    table["difference"] = table["challenger"] - table["champion"]
    if not both:
        return Decision(False, "no held-out run both sets could be scored on: nothing shows the challenger is not "
                        "worse", rule.describe(), 0, float("nan"), empty, table)
    d = table["difference"].to_numpy(dtype=float)
    rng = np.random.default_rng(rule.seed)
    means = d[rng.integers(0, len(d), (rule.n_boot, len(d)))].mean(axis=1) if len(d) > 1 else d
    a = (1 - rule.level) / 2
    lo, hi = (float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))
    mean = float(d.mean())
    promote = lo <= rule.tolerance
    if promote:
        how = "better" if hi < 0 else ("worse by less than the tolerance (immaterial)" if lo > 0
                                       else "not worse beyond the noise of the comparison")
        reason = (f"{how}: mean difference {100 * mean:+.2f} points, {rule.level:.0%} interval "
                  f"[{100 * lo:+.2f}, {100 * hi:+.2f}] over {len(d)} held-out runs")
    else:
        reason = (f"worse: mean difference {100 * mean:+.2f} points, {rule.level:.0%} interval "
                  f"[{100 * lo:+.2f}, {100 * hi:+.2f}] over {len(d)} held-out runs lies above the tolerance "
                  f"{100 * rule.tolerance:g} points")
    return Decision(promote, reason, rule.describe(), len(d), mean, (lo, hi), table)


def heldout_comparisons(traces: Sequence[Trace], coefs: Coefficients) -> dict[str, dict[str, Any]]:
    """run -> :func:`rooflab.replay.metrics.compare` of ``coefs`` replayed on each held-out trace."""
    return {tr.run_id: compare(replay(tr, coefs)) for tr in traces}


def before_after(baseline: Mapping[str, Mapping[str, Any]], candidate: Mapping[str, Mapping[str, Any]],
                 stat: str = "mean_ape") -> pd.DataFrame:
    """Per held-out run and metric, ``stat`` of the baseline and the candidate and the difference (candidate −
    baseline), from two ``run -> compare()`` maps over the same runs."""
    rows = []
    for run in sorted(set(baseline) & set(candidate)):
        for m in METRICS:
            b = float((baseline[run].get(m) or {}).get(stat, np.nan))
            c = float((candidate[run].get(m) or {}).get(stat, np.nan))
            rows.append({"run": run, "metric": m, "baseline": b, "candidate": c, "difference": c - b})
    return pd.DataFrame(rows, columns=["run", "metric", "baseline", "candidate", "difference"])
