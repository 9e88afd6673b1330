"""The claim builder: the tolerance's stated parts, and no claim passes on a tolerance larger
than the effect it tests.

Oracles: the verdict rule of :mod:`sgdlab.lab.claims` written out by hand on numbers whose
comparisons are exact in binary floating point.
"""

from __future__ import annotations

import json
import math
import pickle

import pytest

from sgdlab.lab.claims import VERDICTS, Claim, Tolerance, tolerance


def _claim(**kw) -> Claim:
    base = {
        "id": "t.c",
        "statement": "s",
        "formula": "f",
        "predicted": 1.0,
        "measured": 1.25,
        "stderr": 0.125,
        "tolerance": tolerance(0.125),
    }
    return Claim(**{**base, **kw})


def test_tolerance_parts_sum() -> None:
    t = tolerance(0.125, k=4, model_error=0.25, grid=0.5)
    assert (t.statistical, t.grid, t.model) == (0.5, 0.5, 0.25)
    assert float(t) == 1.25
    c = _claim(tolerance=t)
    d = c.to_dict()
    assert (d["tol_statistical"], d["tol_grid"], d["tol_model"]) == (0.5, 0.5, 0.25)
    assert d["tolerance"] == 1.25 and type(d["tolerance"]) is float
    assert d["seeds"] == 1 and d["effect"] is None
    json.dumps(d)
    assert pickle.loads(pickle.dumps(t)).grid == 0.5


def test_plain_float_tolerance_is_split_stat_then_model() -> None:
    d = _claim(tolerance=0.75).to_dict()
    assert (d["tol_statistical"], d["tol_grid"], d["tol_model"]) == (0.5, 0.0, 0.25)
    d = _claim(tolerance=0.25, stderr=math.nan).to_dict()
    assert (d["tol_statistical"], d["tol_grid"], d["tol_model"]) == (0.0, 0.0, 0.25)
    d = _claim(tol_grid=0.5, tol_statistical=0.25).to_dict()
    assert d["tolerance"] == 0.75 and d["tol_model"] == 0.0


def test_tolerance_larger_than_effect_is_rejected() -> None:
    with pytest.raises(ValueError, match="t.c.*tolerance 0.5 exceeds its effect 0.25"):
        _claim(effect=0.25)
    with pytest.raises(ValueError, match="exceeds its effect"):
        _claim(effect=-0.25)
    assert _claim(effect=0.5).verdict == "agrees"  # tolerance == |effect|: resolved
    assert _claim(effect=-0.75, measured=2.0).verdict == "disagrees"


def test_erratum_effect_defaults_to_distance_from_the_lecture() -> None:
    with pytest.raises(ValueError, match="exceeds its effect"):
        _claim(erratum=1, lecture_value=1.25)  # corrected 1 vs lecture 1.25: tolerance 0.5
    c = _claim(erratum=1, lecture_value=0.0)
    assert c.effect == 1.0 and c.verdict == "lecture corrected"


def test_inconclusive_is_explicit_and_never_a_pass() -> None:
    c = _claim(effect=0.25, inconclusive="tolerance 0.5 exceeds the effect 0.25")
    assert c.verdict == "inconclusive" and "inconclusive" in VERDICTS
    assert c.to_dict()["inconclusive"].startswith("tolerance")


@pytest.mark.parametrize("bad", [{"seeds": 0}, {"seeds": 2.0}, {"tol_grid": -1.0}])
def test_bad_fields_rejected(bad) -> None:
    with pytest.raises(ValueError):
        _claim(**bad)


def test_negative_tolerance_part_rejected() -> None:
    with pytest.raises(ValueError, match="model must be a number >= 0"):
        Tolerance(0.0, 0.0, -1.0)


# --- experiments' claims on synthetic measurements with known answers ---


def _bs_row(b: int, loss: float, exact: float, sqrt_ratio: float) -> dict:
    last = {"examples": 8192, "loss": loss, "loss_se": 0.001 * loss, "loss_exact": exact}
    return {
        "B": b,
        "eta": 0.01 * b,
        "stability": 0.009 * b,
        "trace": [last],
        "sqrt_ratio_exact": sqrt_ratio,
    }


def test_linear_rule_is_not_claimed_past_first_order() -> None:
    """Ratio 1.644 measured where the exact recursion gives 1.55: the claim is the bend
    (predicted 1.55, tolerance the chains' alone), not ratio 1 on a model error wide enough to
    hide it."""
    from sgdlab.lab.experiments import e06_batch_scaling as e06

    ref = _bs_row(1, 1.0, 1.0, 1.0)
    rows = [_bs_row(4, 1.02, 1.01, 0.5), _bs_row(128, 1.644, 1.55, 0.2)]
    made = [e06._linear_rule_claim(r, r["trace"][-1], ref["trace"][-1], 2000) for r in rows]
    by_id = {c.id: c for c in made}
    assert set(by_id) == {"batch_scaling.linear_rule_B4", "batch_scaling.linear_rule_bends_B128"}
    small = by_id["batch_scaling.linear_rule_B4"]
    assert small.predicted == 1.0 and small.tol_model == pytest.approx(0.01)
    assert small.effect == pytest.approx(-0.5) and small.seeds == 2000
    bend = by_id["batch_scaling.linear_rule_bends_B128"]
    assert bend.predicted == pytest.approx(1.55) and bend.effect == pytest.approx(0.55)
    assert bend.tol_model == 0.0 and bend.verdict == "disagrees"  # 1.644 is 0.094 from 1.55


def test_critical_batch_fit_recovers_b_crit() -> None:
    """S = S_min (1 + B_crit/B) exactly: the weighted fit returns B_crit."""
    from sgdlab.lab.experiments import e15_critical_batch as e15

    pts = [{"B": b, "steps": 50.0 * (1 + 100.0 / b), "steps_se": 1.0} for b in (8, 32, 128, 512)]
    fit = e15._fit(pts)
    assert fit["b_crit"] == pytest.approx(100.0, rel=1e-9) and fit["points"] == 4
    # the points lie on the curve: the standard error is the error bars', linear in them
    wider = e15._fit([{**p, "steps_se": 2.0} for p in pts])
    assert wider["b_crit_se"] == pytest.approx(2 * fit["b_crit_se"], rel=1e-9)
    assert 0 < fit["b_crit_se"] < 5
    assert math.isnan(e15._fit(pts[:2])["b_crit"])


def test_critical_batch_claim_needs_enough_points() -> None:
    from sgdlab.lab.experiments import e15_critical_batch as e15

    fit = {"b_crit": 100.0, "b_crit_se": 1.0, "points": 3, "s_min": 1.0, "e_min": 100.0}
    res = {
        "fit": fit,
        "b_simple": 100.0,
        "b_simple_se": 1.0,
        "seeds": 3,
        "min_fit_points": 4,
        "target_loss": 1.3,
        "dropped": [{"point": "B=512", "reason": "never reached"}],
    }
    (c,) = e15.claims(res)
    assert c.verdict == "inconclusive" and "only 3 batch sizes" in c.inconclusive
    (c,) = e15.claims({**res, "fit": {**fit, "points": 4}})
    assert c.verdict == "agrees" and c.tol_model == pytest.approx(math.log10(2))
    wide = {**fit, "points": 4, "b_crit_se": 50.0}  # +-50%: 4 s.e. over half a decade
    (c,) = e15.claims({**res, "fit": wide})
    assert c.verdict == "inconclusive" and "exceeds 0.5" in c.inconclusive


def test_noise_floor_range_factor() -> None:
    """E[max - min] of n standard normals: 2/sqrt(pi) for n = 2, 3/sqrt(pi) for n = 3."""
    from sgdlab.lab.experiments import e07_invariant_adam as e07

    assert e07._range_factor(2) == pytest.approx(2 / math.sqrt(math.pi), rel=1e-6)
    assert e07._range_factor(3) == pytest.approx(3 / math.sqrt(math.pi), rel=1e-6)


def test_headline_spread_is_measured_over_seeds_above_the_noise_floor() -> None:
    """Two batch sizes, two seeds, log-losses chosen by hand: the per-seed spreads, their mean
    and standard error, and the floor 2/sqrt(pi) x the pooled seed-to-seed s.d."""
    from sgdlab.lab.experiments import e07_invariant_adam as e07

    logs = {(8, 0): 0.0, (8, 1): 0.2, (32, 0): 0.4, (32, 1): 0.8}  # spreads 0.4, 0.6
    runs = {"m": [{"B": b, "seed": k, "final_loss": math.exp(v)} for (b, k), v in logs.items()]}
    sp = e07._spreads(runs, [8, 32], seeds=2)["m"]
    assert sp["per_seed"] == pytest.approx([0.4, 0.6])
    assert sp["log_spread"] == pytest.approx(0.5) and sp["log_spread_se"] == pytest.approx(0.1)
    sd = math.sqrt((0.02 + 0.08) / 2)  # variances over the seeds at B = 8 and B = 32
    assert sp["floor"] == pytest.approx(2 / math.sqrt(math.pi) * sd, rel=1e-6)


def test_rmsprop_power_comparison_needs_a_resolved_difference() -> None:
    """sigma vs sigma^2: a difference inside 4 s.e. of 0, or a best lr on its grid's edge, is
    inconclusive, not a pass of 'at least 0' with tolerance 0."""
    from sgdlab.lab.experiments import e08_rmsprop_power as e08

    grid = [{"lr": 1.0, "loss": 2.0}, {"lr": 3.0, "loss": 1.0}, {"lr": 9.0, "loss": 1.5}]
    res = {
        "grids": {"sigma": grid, "sigma2": grid},
        "diff": 0.3,
        "diff_se": 0.1,
        "seeds": 3,
        "best": {
            "sigma": {"lr": 3.0, "losses": [1.0] * 3},
            "sigma2": {"lr": 3.0, "losses": [1.3] * 3},
        },
        "identities": {"inside_vs_slide": 0.0, "outside_vs_torch": 0.0, "inside_vs_outside": 1e-3},
    }
    assert "within 4 s.e." in e08.claims(res)[0].inconclusive
    assert e08.claims({**res, "diff": 0.5})[0].verdict == "agrees"
    edge = {**res, "diff": 0.5, "grids": {"sigma": grid[:2], "sigma2": grid}}
    assert "edge" in e08.claims(edge)[0].inconclusive
    assert e08.claims({**res, "diff": -0.5})[0].verdict == "disagrees"
