"""The batch-size claims of experiments 5 and 7 split the batch sizes at the measured noise scale.

Oracles: a synthetic loss grid whose best learning rate per batch size is known exactly (a
parabola in log-loss over octaves, so the refined minimum is the vertex), and the rule
``B <= B_simple / 2`` for the noise-dominated batch sizes.
"""

from __future__ import annotations

import math

import pytest

from sgdlab.lab.experiments import _mnist
from sgdlab.lab.experiments import e05_conjugacy as e05


def test_noise_dominated_cut() -> None:
    assert _mnist.noise_dominated([8, 32, 64, 65, 128], 130.0) == [8, 32, 64, 65]
    assert _mnist.noise_dominated([8, 32, 128], 10.0) == []


def _grid(best: dict[float, float], octaves=(-2, -1, 0, 1, 2)) -> list[dict[str, float]]:
    cells = []
    for r, c in best.items():
        for k in octaves:
            loss = math.exp(0.1 * (k - c) ** 2)
            cells.append(
                {"row": r, "octave": k, "lr": 2.0**k, "loss": loss, "losses": [loss, loss]}
            )  # two seeds that agree
    return cells


def _results(best_b: dict[int, float], b_simple: float) -> dict:
    return {
        "grids": {
            "eta_prime_ng": _grid({1.0: 0.0, 8.0: 0.25}),
            "eta_ng": _grid({1.0: 0.0, 8.0: -1.0}),  # (a 3-octave shift is off-grid here)
            "eta_prime_b": _grid(best_b),
        },
        "n_g": [1.0, 8.0],
        "batch_sizes": sorted(best_b),
        "noise": {"b_simple": b_simple},
        "seeds": 2,
    }


def test_conjugacy_claims_split_at_noise_scale() -> None:
    res = _results({8: 0.0, 32: 0.3, 128: -1.4}, b_simple=100.0)
    by_id = {c.id: c for c in e05.claims(res)}
    inv = by_id["conjugacy.best_eta_prime_shift_B"]
    assert inv.measured == pytest.approx(0.3, abs=1e-12)  # B = 8 -> 32 only (32 <= 50 < 128)
    assert "B=8 to B=32" in inv.statement and inv.verdict == "agrees"
    drop = by_id["conjugacy.best_eta_prime_drop_B"]
    assert drop.measured == pytest.approx(-1.4, abs=1e-12) and drop.verdict == "agrees"
    assert by_id["conjugacy.best_eta_prime_shift_Ng"].measured == pytest.approx(0.25, abs=1e-12)


def test_conjugacy_drop_claim_fails_when_the_best_rate_rises() -> None:
    res = _results({8: 0.0, 32: 0.0, 128: 1.2}, b_simple=100.0)
    drop = {c.id: c for c in e05.claims(res)}["conjugacy.best_eta_prime_drop_B"]
    assert drop.verdict == "disagrees"


def test_conjugacy_claims_need_two_noise_dominated_batch_sizes() -> None:
    ids = {c.id for c in e05.claims(_results({8: 0.0, 32: 0.0, 128: 0.0}, b_simple=20.0))}
    assert "conjugacy.best_eta_prime_shift_B" not in ids
    assert "conjugacy.best_eta_prime_drop_B" in ids
    ids = {c.id for c in e05.claims(_results({8: 0.0, 32: 0.0, 128: 0.0}, b_simple=1000.0))}
    assert "conjugacy.best_eta_prime_shift_B" in ids
    assert "conjugacy.best_eta_prime_drop_B" not in ids


def test_conjugacy_claims_state_grid_tolerance_and_edges() -> None:
    """The one-octave tolerance is the grid's resolution (not 4 standard errors), the effect is
    the shift the other invariant would give, and a best lr on the grid's edge is inconclusive."""
    by_id = {c.id: c for c in e05.claims(_results({8: 0.0, 32: 0.3, 128: -1.4}, 100.0))}
    inv = by_id["conjugacy.best_eta_prime_shift_Ng"]
    assert (inv.tol_grid, inv.tol_statistical, inv.tol_model) == (1.0, 0.0, 0.0)
    assert inv.effect == pytest.approx(-3.0) and inv.seeds == 2
    assert by_id["conjugacy.best_eta_prime_shift_B"].effect == pytest.approx(-2.0)
    edge = _results({8: 0.0, 32: 2.4, 128: -1.4}, b_simple=100.0)  # B = 32's best at octave 2
    shift_b = {c.id: c for c in e05.claims(edge)}["conjugacy.best_eta_prime_shift_B"]
    assert shift_b.verdict == "inconclusive" and "edge" in shift_b.inconclusive
