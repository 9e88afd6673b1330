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
