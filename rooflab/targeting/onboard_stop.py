"""The stop rule of onboarding (issue 16): a new model / GPU / vLLM version is calibrated when the coefficients,
refitted from run summaries around a prior fitted on other setups, both *predicted* the runs just measured and are
*sure* of the runs not measured yet.

* **prequential** — the runs of the last batch, predicted by the coefficients fitted *before* they were measured
  (for the first batch: the prior), are within the targets: median APE of the run's mean E2E ≤ 5% and mean TTFT ≤
  10% (:data:`TARGETS`; the issue's onboarding targets, which are also docs/spec.md §12's E2E target and a TTFT
  target tighter than its 12%). An out-of-sample check on the new setup itself: no held-out split is needed, every
  run is held out once, before it is fitted.
* **predicted uncertainty** — for every candidate run not measured yet, the 90% interval of its predicted mean E2E
  and mean TTFT under the fit's posterior (:mod:`rooflab.targeting.summary_information`) is within the same
  targets: the coefficients' own uncertainty is not what would make the next prediction miss. Candidates predicted
  to saturate or to fail requests are not judged (a fit could not use them, so they are never proposed); when no
  judged candidate is left the criterion is met (nothing left to be unsure about) and says so.

Or it stops at the GPU budget, the iteration cap, or when no candidate is left. The decision is a
:class:`rooflab.targeting.stop.StopDecision` (one-line reason, every criterion with its value and threshold), like
the campaign's stop rule.
"""

from __future__ import annotations

import math

from rooflab.targeting.stop import Criterion, StopDecision

TARGETS = {"e2e_mean": 0.05, "ttft_mean": 0.10}  # median APE of the runs' means
SHORT = {"e2e_mean": "E2E", "ttft_mean": "TTFT"}


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def onboard_stop(prequential: dict[str, float] | None, halfwidth: dict[str, float] | None, *,
                 gpu_seconds_spent: float, budget_gpu_seconds: float | None, iteration: int,
                 max_iterations: int | None, prequential_runs: int = 0, open_candidates: int = 0) -> StopDecision:
    """Decide after a refit. ``prequential``: median APE (fraction) over the last batch's runs of their mean E2E and
    TTFT, predicted before they were fitted (None: nothing measured yet). ``halfwidth``: the largest 90% relative
    half-width over the open candidates of their predicted mean E2E and TTFT (None or empty: no candidate left).
    ``iteration``: iterations completed (the bootstrap counting as the first)."""
    crit: dict[str, Criterion] = {}
    if prequential is None:
        crit["prequential"] = Criterion(False, "no run measured yet")
    else:
        bad = [m for m, t in TARGETS.items() if not (_finite(prequential.get(m)) and prequential[m] <= t)]
        crit["prequential"] = Criterion(
            not bad, f"last batch ({prequential_runs} run{'s' if prequential_runs != 1 else ''}) predicted before it "
            "was fitted: " + ", ".join(f"{SHORT[m]} {prequential.get(m, math.nan):.1%} {'>' if m in bad else '≤'} "
                                       f"{t:.0%}" for m, t in TARGETS.items()),
            {m: prequential.get(m) for m in TARGETS}, dict(TARGETS))
    if halfwidth:
        bad = [m for m, t in TARGETS.items() if not (_finite(halfwidth.get(m)) and halfwidth[m] <= t)]
        crit["predicted_uncertainty"] = Criterion(
            not bad, f"90% half-width over {open_candidates} open candidates at most: " + ", ".join(
                f"{SHORT[m]} ±{halfwidth.get(m, math.nan):.1%} {'>' if m in bad else '≤'} {t:.0%}"
                for m, t in TARGETS.items()), {m: halfwidth.get(m) for m in TARGETS}, dict(TARGETS))
    elif prequential is not None:
        crit["predicted_uncertainty"] = Criterion(True, "no open candidate left that a fit could use")
    converged = all(c.met for c in crit.values())
    budget_hit = budget_gpu_seconds is not None and gpu_seconds_spent >= budget_gpu_seconds
    cap_hit = max_iterations is not None and iteration >= max_iterations
    crit["budget"] = Criterion(bool(budget_hit), f"{gpu_seconds_spent / 3600:.2f} of " + (
        "unlimited" if budget_gpu_seconds is None else f"{budget_gpu_seconds / 3600:.2f}") + " GPU-h",
        float(gpu_seconds_spent), None if budget_gpu_seconds is None else float(budget_gpu_seconds))
    crit["iteration_cap"] = Criterion(bool(cap_hit), f"iteration {iteration} of "
                                      + ("unlimited" if max_iterations is None else str(max_iterations)),
                                      int(iteration), max_iterations)
    unmet = StopDecision(False, "", crit).unmet
    if converged:
        return StopDecision(True, "calibrated: " + "; ".join(c.text for k, c in crit.items()
                                                             if k not in ("budget", "iteration_cap")), crit, True)
    tail = "unmet: " + "; ".join(unmet)
    if budget_hit and budget_gpu_seconds is not None:
        return StopDecision(True, f"budget spent: {gpu_seconds_spent / 3600:.2f} of {budget_gpu_seconds / 3600:.2f} "
                            f"GPU-h; {tail}", crit)
    if cap_hit:
        return StopDecision(True, f"iteration cap {max_iterations} reached; {tail}", crit)
    return StopDecision(False, f"continue ({crit['iteration_cap'].text}, {crit['budget'].text}); {tail}", crit)
