"""End-to-end calibration (issue 7): fit β and α from request-level data only (TTFT / E2E of requests, as
inference-perf measures them), by minimising the replay error of training runs.

Most users have no step records, only per-request latencies. Their latencies are produced by the
scheduler running the step-time model, so the calibration replays the training runs
(:func:`rooflab.replay.predict.replay`) and adjusts the coefficients until the predicted TTFT and E2E match.

Two loops:

1. **Stacked per-request GPU time (inner, linear).** With the batch compositions of one replay held fixed,
   a request's predicted latency is linear in the coefficients: its TTFT is α0 plus the feature vectors of
   every step from the one it queued during (the fraction still to run) to the one that produced its first
   token, times β; its E2E adds the steps to its last token and α1 + α2·n_out. Stacking these sums for all
   requests of all training runs gives a bounded least-squares problem in relative error — per-request
   TTFT and E2E, every run weighted equally, the Gaussian prior of docs/spec.md §7 toward 1 on β1–β5 — solved
   exactly like the step-level fit. Re-replaying with the solution and solving again (a fixed-point
   iteration) lets the compositions follow the coefficients (bigger batches when steps get slower).
2. **Derivative-free polish (outer).** Nelder–Mead on the true replay objective (what the linearisation
   cannot see: queueing feedback, the absolute-error metric), over three log-scale factors — all of β
   (step-time scale), β1 (prefill) and all of α — so it costs tens of replays, not hundreds.

The objective of both the polish and the reported training error: mean over training runs of
(TTFT APE of the run mean + E2E APE of the run mean + TTFT per-request MAPE + E2E per-request MAPE) / 4.
The inner loop and the polish replay a time window of each run (``window_s`` after a ``lead_s`` warm-up,
whose requests are replayed but not scored) for speed; the final result is always checked on full
replays by the caller (``scripts/replay_real.py``, ``rooflab calibrate-e2e``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import lsq_linear, minimize

from rooflab.data.traces import Trace
from rooflab.errors import InputError
from rooflab.model.coefficients import Coefficients
from rooflab.model.features import DEFAULT_FORMULAS, featurize
from rooflab.model.terms import Variant
from rooflab.model.variants import DEFAULT_VARIANT, get_variant, resolve_formulas
from rooflab.replay.metrics import compare
from rooflab.replay.predict import ReplayResult, replay

PHYSICAL = (0.3, 5.0)  # docs/spec.md §1: β1–β5 are efficiency corrections, physically ~0.3 … ~5
# α upper bounds (µs, µs, µs/token): an API overhead under 1 s; a post-decode overhead under 20 ms; detokenising
# and streaming under 100 µs per output token (BLIS's shipped values: 15.6 ms, 0.78 ms, 46 µs/token). Without
# them α1 + α2·n_out trades against the decode steps (β2, β6): on the real runs α went to 100 ms + 1 ms/token
# and β2 to 0.7, which fits the training runs' E2E but under-predicts the step time under load (no saturation
# in the overloaded runs)
ALPHA_MAX = (1e6, 2e4, 100.0)
PRIOR_START = {"beta1": 1.0, "beta1_attn": 1.0, "beta2": 1.0, "beta3": 1.0, "beta4": 1.0, "beta5": 1.0,
               "beta6": 10.0, "beta7": 100.0, "beta_layer": 10.0}


@dataclass(frozen=True)
class E2EOptions:
    variant: str = DEFAULT_VARIANT
    formulas: str = "vllm"
    prior_strength: float = 1e-3  # λ: mean squared relative error one unit of (β−1)² is worth (as in the step fit)
    window_s: float | None = 180.0  # replay windows of this length of each training run (None: all of it)
    windows: int = 2  # windows per run, spread evenly over the run
    lead_s: float = 30.0  # warm-up replayed before each window, not scored
    iterations: int = 4  # fixed-point iterations of the stacked linear fit
    polish_evals: int = 24  # Nelder–Mead replay evaluations (0: no polish)
    fit_beta: bool = True  # False: β fixed (from the start), α only


@dataclass
class E2EResult:
    coefficients: Coefficients
    start: Coefficients
    history: list[dict[str, Any]] = field(default_factory=list)  # [{stage, objective, beta, alpha, seconds}]
    train: dict[str, dict[str, Any]] = field(default_factory=dict)  # run -> compare() on the calibration windows
    seconds: float = 0.0
    options: E2EOptions = E2EOptions()

    def to_dict(self) -> dict:
        return {"coefficients": self.coefficients.to_dict(), "start": self.start.to_dict(),
                "history": self.history, "train_windows": self.train, "seconds": self.seconds,
                "options": self.options.__dict__}


def prior_coefficients(variant: str = DEFAULT_VARIANT, formulas: str = DEFAULT_FORMULAS) -> Coefficients:
    v = get_variant(variant)
    return Coefficients({n: PRIOR_START[n] for n in v.names}, (0.0, 0.0, 0.0), v.name, formulas, "priors", False,
                        ["start: priors (β1–β5 = 1, β6 = 10 µs, β7 = 100 µs, β_layer = 10 µs, α = 0)"])


def _as_start(start: Coefficients | None, options: E2EOptions) -> Coefficients:
    if start is None:
        return prior_coefficients(options.variant, options.formulas)
    v = get_variant(options.variant)
    beta = {n: float(start.beta.get(n, PRIOR_START[n])) for n in v.names}
    if start.variant != v.name and start.formulas == "blis":
        raise InputError(start.source, "variant", f"start {v.name} from coefficients of the same variant, not "
                         f"{start.variant}")
    return Coefficients(beta, tuple(start.alpha), v.name, start.formulas or options.formulas, start.source,
                        start.alpha_fitted, list(start.notes))


# ---------------------------------------------------------------------------------------------------
# the stacked per-request design


def stacked_rows(trace: Trace, result: ReplayResult, variant: str | Variant,
                 formulas: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per request the replay completed: the summed feature vectors of the steps spanning its TTFT (``Xt``) and
    its E2E (``Xe``) in ``result`` (a replay with ``record=True``), so that with these batch compositions
    ``TTFT = α0 + Xt·β`` and ``E2E = α0 + Xe·β + α1 + α2·n_out``; and the mask of those requests."""
    v = get_variant(variant)
    st = result.steps
    if st is None:
        raise InputError(None, "record", "stacked_rows needs a replay with record=True")
    frame = st.assign(model=trace.model, tp=int(trace.tp), hardware=trace.hardware)
    X = v.design_matrix(featurize(frame, resolve_formulas(v, formulas)))
    starts = st["t_start_us"].to_numpy(dtype=float)
    durs = st["step_time_us"].to_numpy(dtype=float)
    ends = starts + durs
    cum = np.vstack([np.zeros((1, X.shape[1])), np.cumsum(X, axis=0)])
    df = result.requests
    kept = ~df["pred_failed"].to_numpy(dtype=bool)
    d = df[kept]
    q = d["queued_us"].to_numpy(dtype=float)
    k0 = np.searchsorted(starts, q - 1e-6, side="left")
    kf = np.searchsorted(ends, d["first_token_us"].to_numpy(dtype=float) - 1e-6, side="left")
    ke = np.searchsorted(ends, d["finished_us"].to_numpy(dtype=float) - 1e-6, side="left")
    prev = np.maximum(k0 - 1, 0)
    frac = np.where(k0 > 0, np.clip((ends[prev] - q) / np.where(durs[prev] > 0, durs[prev], 1.0), 0.0, 1.0), 0.0)
    wait = frac[:, None] * X[prev]
    return wait + cum[kf + 1] - cum[k0], wait + cum[ke + 1] - cum[k0], kept


def stacked_design(trace: Trace, result: ReplayResult, variant: str | Variant, formulas: str | None = None) -> dict:
    """:func:`stacked_rows` of the requests that also succeeded in the measurement (and are scored), with their
    measured TTFT and E2E."""
    v = get_variant(variant)
    Xt, Xe, kept = stacked_rows(trace, result, v, formulas)
    df = result.requests
    keep = ~df["failed"].to_numpy(dtype=bool) & kept
    if "scored" in df:
        keep &= df["scored"].to_numpy(dtype=bool)
    keep &= np.isfinite(df["ttft_us"].to_numpy(dtype=float)) & (df["ttft_us"].to_numpy(dtype=float) > 0)
    keep &= np.isfinite(df["e2e_us"].to_numpy(dtype=float)) & (df["e2e_us"].to_numpy(dtype=float) > 0)
    # data anomalies: a response whose recorded output count is far too small for its duration (its ITL is
    # 10× the run's median) says nothing about step times; kept in the metrics, left out of the fit
    itl = df["itl_us"].to_numpy(dtype=float)
    med = np.nanmedian(itl[keep]) if np.isfinite(itl[keep]).any() else np.nan
    if np.isfinite(med):
        keep &= ~(itl > 10 * med)
    sel = keep[kept]  # rows of Xt/Xe are the replay-completed requests
    d = df[keep]
    return {"run": trace.run_id, "Xt": Xt[sel], "Xe": Xe[sel], "n_out": d["output_tokens"].to_numpy(dtype=float),
            "ttft": d["ttft_us"].to_numpy(dtype=float), "e2e": d["e2e_us"].to_numpy(dtype=float),
            "names": v.names}


def stacked_system(d: dict) -> tuple[np.ndarray, np.ndarray]:
    """The weighted least-squares rows (A, b) of one stacked design over θ = (β, α0, α1, α2): relative TTFT, E2E
    and ITL errors of its requests, the design weighted 1 in all (each run counts equally)."""
    n = len(d["ttft"])
    p = d["Xt"].shape[1] if n else len(d["names"])
    if n == 0:
        return np.zeros((0, p + 3)), np.zeros(0)
    w = 1.0 / np.sqrt(3.0 * n)
    one = np.ones(n)
    zero = np.zeros(n)
    yt, ye = d["ttft"], d["e2e"]
    At = np.column_stack([d["Xt"], one, zero, zero]) / yt[:, None]
    Ae = np.column_stack([d["Xe"], one, one, d["n_out"]]) / ye[:, None]
    rows, rhs = [At * w, Ae * w], [one * w, one * w]
    # ITL = (E2E − TTFT)/(n_out − 1): the decode part alone, so that α1 cannot stand in for decode steps
    m = d["n_out"] > 1
    if m.any():
        k = d["n_out"][m] - 1
        yi = (ye[m] - yt[m]) / k
        ok = yi > 0
        Ai = np.column_stack([(d["Xe"][m] - d["Xt"][m]), np.zeros(m.sum()), np.ones(m.sum()), d["n_out"][m]])
        Ai = Ai / (k * yi)[:, None]
        rows.append(Ai[ok] * w)
        rhs.append(np.full(int(ok.sum()), w))
    return np.vstack(rows), np.concatenate(rhs)


def fit_stacked(designs: list[dict], start: Coefficients, *, prior_strength: float = 1e-3, fit_beta: bool = True,
                fit_alpha: bool = True) -> Coefficients:
    """Bounded least squares of per-request relative TTFT, E2E and ITL errors over the stacked designs (each
    run weighted equally; the three kinds of rows equally), prior toward 1 on β1–β5 within :data:`PHYSICAL`,
    α within :data:`ALPHA_MAX`."""
    variant = get_variant(start.variant)
    names = variant.names
    p = len(names)
    rows, rhs = [], []
    for d in designs:
        if len(d["ttft"]) == 0:
            continue
        A_d, b_d = stacked_system(d)
        rows.append(A_d)
        rhs.append(b_d)
    if not rows:
        raise InputError(None, "requests", "no request succeeded in both the measurement and the replay")
    A = np.vstack(rows)
    b = np.concatenate(rhs)
    theta0 = np.array([start.beta.get(n, 0.0) for n in names] + list(start.alpha), dtype=float)
    free = np.array([fit_beta] * p + [fit_alpha] * 3)
    lo = np.array([PHYSICAL[0] if t.prior is not None else 0.0 for t in variant.terms] + [0.0] * 3)
    hi = np.array([PHYSICAL[1] if t.prior is not None else np.inf for t in variant.terms] + list(ALPHA_MAX))
    # prior rows (docs/spec.md §7: same units as the data term)
    if fit_beta and prior_strength > 0:
        for j, t in enumerate(variant.terms):
            if t.prior is not None:
                r = np.zeros(p + 3)
                r[j] = np.sqrt(prior_strength)
                A = np.vstack([A, r])
                b = np.append(b, np.sqrt(prior_strength) * t.prior)
    # fixed parameters move to the right-hand side
    b = b - A[:, ~free] @ theta0[~free]
    Af = A[:, free]
    scale = np.sqrt((Af ** 2).sum(axis=0))
    scale = np.where(scale > 0, scale, 1.0)
    res = lsq_linear(Af / scale, b, bounds=(lo[free] * scale, hi[free] * scale), method="bvls", lsmr_tol="auto")
    theta = theta0.copy()
    theta[free] = res.x / scale
    beta = dict(zip(names, map(float, theta[:p])))
    return start.with_values(beta=beta, alpha=tuple(map(float, theta[p:])))


# ---------------------------------------------------------------------------------------------------
# objective and the calibration


def objective(comparisons: dict) -> float:
    """Mean over runs of (TTFT mean-APE + E2E mean-APE + TTFT per-request MAPE + E2E per-request MAPE) / 4."""
    vals = []
    for c in comparisons.values():
        t, e = c.get("ttft") or {}, c.get("e2e") or {}
        if not t.get("n") or not e.get("n"):
            vals.append(1.0)  # nothing comparable (everything failed in the replay): as bad as 100% error
            continue
        vals.append((t["mean_ape"] + e["mean_ape"] + t["request_mape"] + e["request_mape"]) / 4)
    return float(np.mean(vals)) if vals else float("nan")


def _windows(traces: list[Trace], options: E2EOptions) -> list[Trace]:
    if options.window_s is None:
        return traces
    out = []
    for tr in traces:
        span = (tr.requests["arrival_us"].max() - tr.requests["arrival_us"].min()) / 1e6
        k = max(1, options.windows)
        for j in range(k):
            t0 = (j + 0.5) * span / k - options.window_s / 2
            t0 = min(max(options.lead_s, t0), max(0.0, span - options.window_s))
            w = tr.window(t0, t0 + options.window_s, options.lead_s)
            w.run_id = f"{tr.run_id}@{t0:.0f}s" if k > 1 else tr.run_id
            out.append(w)
    return out


def evaluate(traces: list[Trace], coefs: Coefficients, *, record: bool = False
             ) -> tuple[dict[str, dict[str, Any]], dict[str, ReplayResult]]:
    """Replay every trace; returns ({run: compare()}, {run: ReplayResult})."""
    results = {tr.run_id: replay(tr, coefs, record=record) for tr in traces}
    return {k: compare(r) for k, r in results.items()}, results


def _snapshot(stage: str, coefs: Coefficients, obj: float, t0: float) -> dict:
    return {"stage": stage, "objective": obj, "beta": dict(coefs.beta), "alpha": list(coefs.alpha),
            "seconds": round(time.perf_counter() - t0, 2)}


def _blend(a: Coefficients, b: Coefficients, t: float) -> Coefficients:
    """(1 − t)·a + t·b, coefficient by coefficient."""
    if t == 1.0:
        return b
    beta = {n: float((1 - t) * a.beta[n] + t * b.beta[n]) for n in a.beta}
    return a.with_values(beta=beta, alpha=tuple(float((1 - t) * x + t * y) for x, y in zip(a.alpha, b.alpha)))


def _scaled(c: Coefficients, f_all: float, f_pf: float, f_alpha: float) -> Coefficients:
    beta = {}
    v = get_variant(c.variant)
    for t in v.terms:
        x = c.beta[t.name] * f_all * (f_pf if t.name in ("beta1", "beta1_attn") else 1.0)
        if t.prior is not None:
            x = float(np.clip(x, *PHYSICAL))
        beta[t.name] = float(x)
    return c.with_values(beta=beta, alpha=tuple(float(a * f_alpha) for a in c.alpha))


def calibrate_e2e(traces: list[Trace], start: Coefficients | None = None, options: E2EOptions = E2EOptions(), *,
                  log: Callable[[str], None] | None = None) -> E2EResult:
    """Calibrate β/α on the training ``traces`` by replay (see the module docstring)."""
    if not traces:
        raise InputError(None, "runs", "end-to-end calibration needs at least one training run")
    t_start = time.perf_counter()
    say = log or (lambda msg: None)
    start_c = _as_start(start, options)
    win = _windows(traces, options)
    seen: dict[str, int] = {}
    for tr in win:  # results are keyed by run id: make them unique
        k = seen[tr.run_id] = seen.get(tr.run_id, 0) + 1
        if k > 1:
            tr.run_id = f"{tr.run_id}#{k}"
    history = []
    comps, results = evaluate(win, start_c, record=True)
    best, best_obj = start_c, objective(comps)
    history.append(_snapshot("start", start_c, best_obj, t_start))
    say(f"start: objective {best_obj:.4f}")
    for it in range(options.iterations):
        designs = [stacked_design(tr, results[tr.run_id], best.variant, best.formulas) for tr in win]
        cand = fit_stacked(designs, best, prior_strength=options.prior_strength, fit_beta=options.fit_beta)
        # backtracking: the linearisation holds batch compositions fixed, so a step that tips a run into (or
        # out of) saturation can overshoot; move part of the way until the replay objective improves
        for shrink in (1.0, 0.5, 0.25):
            nxt = _blend(best, cand, shrink)
            comps, res_n = evaluate(win, nxt, record=True)
            obj = objective(comps)
            history.append(_snapshot(f"stacked {it + 1}" + (f" (step {shrink:g})" if shrink < 1 else ""), nxt, obj,
                                     t_start))
            say(f"stacked fit {it + 1}, step {shrink:g}: objective {obj:.4f}")
            if obj < best_obj:
                break
        if obj >= best_obj:
            break
        improved = best_obj - obj
        best, best_obj, results = nxt, obj, res_n
        if improved < 1e-4:
            break
    if options.polish_evals > 0:
        cache: dict[tuple, tuple[float, Coefficients]] = {}

        dims = 3 if options.fit_beta else 1

        def f(x: np.ndarray) -> float:
            key = tuple(np.round(x, 6))
            if key not in cache:
                fa, fp, fal = np.exp(x) if dims == 3 else (1.0, 1.0, float(np.exp(x[0])))
                c = _scaled(best, fa, fp, fal)
                cache[key] = (objective(evaluate(win, c)[0]), c)
            return cache[key][0]

        x0 = np.zeros(dims)
        simplex = np.vstack([x0, np.diag([0.05, 0.15, 0.15][:dims] if dims == 3 else [0.15])])
        minimize(f, x0, method="Nelder-Mead",
                 options={"maxfev": options.polish_evals, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-4})
        obj, c = min(cache.values(), key=lambda v: v[0])
        history.append(_snapshot("polish", c, obj, t_start))
        say(f"polish ({len(cache)} replays): objective {obj:.4f}")
        if obj < best_obj:
            best, best_obj = c, obj
    comps, _ = evaluate(win, best)
    best = best.with_values(source=f"e2e calibration on {len(traces)} runs: {', '.join(t.run_id for t in traces)}")
    best.notes = [n for n in best.notes if not n.startswith("α not fitted")] + \
        [f"end-to-end calibration (replay objective {best_obj:.4f} on the training windows)"]
    best.alpha_fitted = True
    return E2EResult(best, start_c, history, comps, time.perf_counter() - t_start, options)
