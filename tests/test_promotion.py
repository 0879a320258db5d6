"""The registry's promotion rule (issue 18): a paired comparison over held-out runs with a bootstrap interval of the
mean difference; promote unless the challenger is worse beyond the noise (and the tolerance)."""

import numpy as np
import pytest

from rooflab.replay.promotion import PromotionRule, before_after, decide, run_error

STRICT = PromotionRule(tolerance=0.0)


def test_no_champion_promotes_the_first_calibration():
    d = decide(None, {"a": 0.1, "b": 0.2})
    assert d.promote and "no champion" in d.reason and d.n_runs == 0 and len(d.table) == 2


def test_consistently_better_is_promoted():
    champ = {f"r{i}": 0.10 + 0.01 * i for i in range(6)}
    chall = {k: v - 0.02 for k, v in champ.items()}
    d = decide(champ, chall, STRICT)
    assert d.promote and d.reason.startswith("better") and d.ci[1] < 0
    assert d.mean_difference == pytest.approx(-0.02)


def test_consistently_worse_is_refused_and_noise_is_not():
    champ = {f"r{i}": 0.10 for i in range(6)}
    worse = {k: v + 0.03 + 0.002 * i for i, (k, v) in enumerate(champ.items())}
    d = decide(champ, worse, STRICT)
    assert not d.promote and d.verdict == "refused" and d.ci[0] > 0 and d.reason.startswith("worse")
    # the same mean difference with run-to-run disagreement larger than it: within the noise, promoted
    noisy = {k: v + (0.03 + (0.2 if i % 2 else -0.2)) for i, (k, v) in enumerate(champ.items())}
    d2 = decide(champ, noisy, STRICT)
    assert d2.promote and d2.ci[0] < 0 < d2.ci[1] and "noise" in d2.reason


def test_tolerance_is_a_materiality_floor():
    champ = {f"r{i}": 0.10 for i in range(5)}
    slightly = {k: v + 0.002 for k, v in champ.items()}
    assert not decide(champ, slightly, STRICT).promote
    d = decide(champ, slightly, PromotionRule(tolerance=0.005))
    assert d.promote and "immaterial" in d.reason
    assert not decide(champ, {k: v + 0.02 for k, v in champ.items()}, PromotionRule(tolerance=0.005)).promote


def test_no_common_run_refuses_and_one_run_is_its_own_interval():
    assert not decide({"a": 0.1}, {"b": 0.1}).promote
    d = decide({"a": 0.1, "b": np.nan}, {"a": 0.12, "b": 0.1}, STRICT)
    assert d.n_runs == 1 and d.ci == pytest.approx((0.02, 0.02)) and not d.promote


def test_decision_is_reproducible_and_reported():
    champ = {f"r{i}": 0.1 + 0.01 * np.sin(i) for i in range(8)}
    chall = {k: v + 0.01 * np.cos(i) for i, (k, v) in enumerate(champ.items())}
    a, b = decide(champ, chall), decide(champ, chall)
    assert a.ci == b.ci
    doc = a.to_dict()
    assert doc["decision"] in ("promoted", "refused") and len(doc["table"]) == 8 and "bootstrap" in doc["rule"]
    md = a.markdown()
    assert md.startswith("| held-out run | champion (before) | challenger (after) | difference |")
    assert f"**{a.verdict}**" in md


def test_run_error_and_before_after():
    c = {"ttft": {"mean_ape": 0.3}, "itl": {"mean_ape": 0.1}, "e2e": {"n": 0}}
    assert run_error(c) == pytest.approx(0.2)
    assert np.isnan(run_error({}))
    t = before_after({"r": c}, {"r": {"ttft": {"mean_ape": 0.1}, "itl": {"mean_ape": 0.1}}})
    assert list(t.metric) == ["ttft", "itl", "e2e"] and t.difference.iloc[0] == pytest.approx(-0.2)
