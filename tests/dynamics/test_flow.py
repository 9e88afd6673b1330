"""Gradient flow: exact and numerical solutions agree; measured convergence orders of gradient
descent (1), the modified flow (2), and SGD (weak 1, RMS 1/2) against the flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgdlab.dynamics import (
    DoubleWell,
    LogisticRegression,
    Quadratic,
    convergence_order,
    flow_errors,
    gradient_flow,
    simulate_sgd,
)

torch.set_num_threads(1)

H2 = np.array([[1.0, 0.3], [0.3, 0.5]])


def test_exact_quadratic_flow_matches_solve_ivp_and_closed_form():
    p = Quadratic(H2, np.eye(2), optimum=[1.0, -1.0])
    init = torch.tensor([[2.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    times = [0.0, 0.5, 3.0]
    exact = gradient_flow(p, init, times)
    ivp = gradient_flow(p, init, times, method="ivp")
    torch.testing.assert_close(exact, ivp, rtol=0, atol=1e-9)
    w, V = np.linalg.eigh(H2)
    e0 = init.numpy() - p.optimum
    for k, t in enumerate(times):
        ref = p.optimum + e0 @ (V * np.exp(-w * t)) @ V.T
        np.testing.assert_allclose(exact[k].numpy(), ref, atol=1e-13)
    # modified flow: exact vs ivp with autograd Hessian-vector products
    torch.testing.assert_close(
        gradient_flow(p, init, times, modified_lr=0.2),
        gradient_flow(p, init, times, modified_lr=0.2, method="ivp"),
        rtol=0,
        atol=1e-9,
    )


def test_gradient_descent_over_flow_ratio_on_a_quadratic():
    h, eta, t = 0.8, 0.01, 4.0
    p = Quadratic(h, 1.0)
    errs = flow_errors(p, [eta], t, [1.0], stochastic=False)
    gd = (1 - eta * h) ** int(round(t / eta))
    flow = np.exp(-h * t)
    assert errs["rms_error"][0] == pytest.approx(abs(gd - flow), rel=1e-9)
    assert gd / flow == pytest.approx(np.exp(-eta * h**2 * t / 2), rel=2 * (eta * h) ** 2 * t)


@pytest.mark.parametrize(
    "problem,init",
    [
        (Quadratic(H2, np.eye(2)), [2.0, -1.0]),
        (DoubleWell(), [0.2]),
        (LogisticRegression.synthetic(200, 2, seed=0), [1.0, -1.0]),
    ],
)
def test_gradient_descent_is_first_order_and_modified_flow_second_order(problem, init):
    lrs = [0.04, 0.02, 0.01, 0.005]
    gd = flow_errors(problem, lrs, 2.0, init, stochastic=False)["rms_error"]
    mod = flow_errors(problem, lrs, 2.0, init, stochastic=False, modified=True)["rms_error"]
    assert abs(convergence_order(lrs, gd) - 1.0) < 0.2
    assert abs(convergence_order(lrs, mod) - 2.0) < 0.2
    assert np.all(mod < gd)


def test_sgd_weak_error_first_order_rms_error_half_order():
    p = Quadratic(np.diag([1.0, 0.5]), np.diag([1.0, 2.0]))
    lrs = [0.04, 0.02, 0.01, 0.005]
    errs = flow_errors(p, lrs, 3.0, [2.0, -1.0], chains=10000, seed=1)
    # the estimates are precise enough to measure the slopes
    assert np.all(errs["weak_stderr"] < 0.15 * errs["weak_error"])
    assert abs(convergence_order(lrs, errs["weak_error"]) - 1.0) < 0.2
    assert abs(convergence_order(lrs, errs["rms_error"]) - 0.5) < 0.2


def test_sgd_on_a_nonlinear_problem_weak_first_order_rms_half_order():
    # descending into the right well of the double well (no barrier crossing)
    lrs = [0.04, 0.02, 0.01, 0.005]
    errs = flow_errors(DoubleWell(noise_std=0.5), lrs, 2.0, [1.6], chains=4000, seed=2)
    assert np.all(errs["weak_stderr"] < 0.15 * errs["weak_error"])
    assert abs(convergence_order(lrs, errs["weak_error"]) - 1.0) < 0.2
    assert abs(convergence_order(lrs, errs["rms_error"]) - 0.5) < 0.2


def test_bad_input():
    p = Quadratic(1.0, 1.0)
    with pytest.raises(ValueError, match="times"):
        gradient_flow(p, [1.0], [-1.0])
    with pytest.raises(ValueError, match="exact"):
        gradient_flow(DoubleWell(), [1.0], [1.0], method="exact")
    with pytest.raises(ValueError, match="integer"):
        flow_errors(p, [0.3], 1.0, [1.0])
    with pytest.raises(ValueError, match="step sizes"):
        convergence_order([0.1], [0.2])


def test_flow_at_repeated_and_zero_times_on_the_ode_path():
    """The solve_ivp path (a non-quadratic problem) at times that repeat or are all 0, as the
    closed-form quadratic path allows (it failed in solve_ivp's argument checks)."""
    well = DoubleWell()
    at = gradient_flow(well, [0.5], [1.0, 0.0, 1.0, 0.5])
    assert at.shape == (4, 1, 1)
    assert torch.equal(at[0], at[2]) and at[1].item() == 0.5
    assert torch.allclose(at[3], gradient_flow(well, [0.5], [0.5])[0], rtol=0, atol=1e-9)
    assert gradient_flow(well, [0.5], [0.0, 0.0]).reshape(-1).tolist() == [0.5, 0.5]


def test_weak_error_compares_each_chain_with_its_own_flow():
    """With one starting point per chain, the weak error is |E f(Phi_K) - E f(Phi(t))| over
    the chains' own flows (chain 0's flow was used for all: 24x too large); full-batch GD
    runs one chain per starting point."""
    q = Quadratic([1.0, 0.5], [1.0, 1.0])
    R = 400
    init = np.random.default_rng(0).standard_normal((R, 2)) * 3
    e = flow_errors(q, [0.1], 2.0, init, chains=R)
    run = simulate_sgd(q, 0.1, 1, 20, R, init=init, statistics=False, seed=0)
    ref = gradient_flow(q, init, [2.0])[0]
    expected = abs(float((q.loss(run.final) - q.loss(ref)).mean()))
    assert e["weak_error"][0] == pytest.approx(expected, rel=1e-12)
    full = flow_errors(q, [0.1], 2.0, init[:5], stochastic=False)
    gd = simulate_sgd(q, 0.1, 1, 20, 5, init=init[:5], statistics=False, sampling="full")
    assert full["rms_error"][0] == pytest.approx(
        float(((gd.final - gradient_flow(q, init[:5], [2.0])[0]) ** 2).sum(-1).mean()) ** 0.5,
        rel=1e-12,
    )
