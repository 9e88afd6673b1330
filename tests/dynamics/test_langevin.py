"""Langevin SDE simulation against exact laws: the Euler-Maruyama stationary covariance
(discrete Lyapunov), the Gibbs density (KS distance, Gibbs alpha = 1/2), and the double well's
mean first-passage time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgdlab.dynamics import (
    DoubleWell,
    GaussianLeastSquares,
    Problem,
    Quadratic,
    Quartic,
    estimate_gibbs_alpha,
    estimate_mean,
    first_passage_times,
    ks_distance,
    langevin_stationary_density,
    mean_first_passage_time,
    ou_covariance,
    simulate_langevin,
    simulate_sgd,
    stationary_covariance,
    z_score,
)

torch.set_num_threads(1)


def _assert_z(estimate, stderr, reference):
    z = z_score(estimate, stderr, reference)
    assert abs(z) < 4, f"estimate {estimate} ± {stderr} vs exact {reference}: z = {z:.2f}"


def test_euler_maruyama_stationary_covariance_is_a_discrete_lyapunov_solution():
    # EM with step dt on the OU SDE is the linear recursion e' = (I - dt H) e + sqrt(dt) L z,
    # L L^T = eta C / B: its stationary covariance solves S = A S A^T + dt eta C / B, which is
    # stationary_covariance(H, eta C / dt, dt, B); it tends to the OU covariance as dt -> 0.
    H = np.array([[1.0, 0.2], [0.2, 0.5]])
    C = np.array([[1.0, 0.3], [0.3, 2.0]])
    eta, B, dt = 0.2, 2, 0.05
    S = stationary_covariance(H, eta * C / dt, dt, B)
    R = 2000
    rng = np.random.default_rng(0)
    init = torch.as_tensor(rng.multivariate_normal(np.zeros(2), S, size=R))
    r = simulate_langevin(Quadratic(H, C), eta, 30.0, dt, R, batch_size=B, init=init, seed=1)
    m, se = estimate_mean(r.second_moment.reshape(R, 4))
    for k in range(4):
        _assert_z(m[k], se[k], S.reshape(-1)[k])
    S_ou = ou_covariance(H, C, eta, B)
    gaps = [
        np.abs(stationary_covariance(H, eta * C / h, h, B) - S_ou).max() for h in (0.04, 0.02, 0.01)
    ]
    np.testing.assert_allclose(np.array(gaps[:-1]) / np.array(gaps[1:]), 2.0, rtol=0.05)


def test_quartic_langevin_reaches_gibbs_with_alpha_one_half():
    eta, sigma = 0.2, 1.0
    p = Quartic(sigma)
    R = 3000
    dens = langevin_stationary_density(p.loss_numpy, eta, sigma**2)
    r = simulate_langevin(p, eta, 40.0, 0.01, R, init=torch.zeros(R, 1), burn_in_time=10.0, seed=2)
    # the final states are R independent draws: KS distance to the Gibbs cdf
    D, pval = ks_distance(r.final[:, 0], dens.cdf)
    assert D * np.sqrt(R) < 1.95, f"KS distance {D} (p = {pval})"
    # a wrong temperature is rejected by the same test (alpha = 1/10 of the slide)
    wrong = langevin_stationary_density(p.loss_numpy, eta, sigma**2 / 5)
    assert ks_distance(r.final[:, 0], wrong.cdf)[0] * np.sqrt(R) > 5
    alpha, se = estimate_gibbs_alpha(r.loss, p.loss_numpy, eta, sigma**2)
    _assert_z(alpha, np.hypot(se, 0.01), 0.5)  # 0.01: O(dt) bias allowance
    assert se < 0.02


def test_sgd_on_the_quartic_is_gibbs_to_first_order_in_eta():
    # SGD is EM with dt = eta: alpha = 1/2 + O(eta)
    eta = 0.05
    p = Quartic(1.0)
    R = 2000
    r = simulate_sgd(p, eta, 1, 3000, R, init=torch.zeros(R, 1), burn_in=1000, seed=3)
    alpha, se = estimate_gibbs_alpha(r.loss, p.loss_numpy, eta, 1.0)
    assert abs(alpha - 0.5) < 4 * se + eta / 2, (alpha, se)
    assert abs(alpha - 0.1) > 20 * se


def test_double_well_mean_first_passage_time_by_simulation():
    # a hotter temperature than the lecture's T = 0.1 keeps the run short; T = sigma^2 eta / 2
    T = 0.25
    eta = 0.5
    p = DoubleWell(noise_std=np.sqrt(2 * T / eta))
    exact = mean_first_passage_time(p.loss_numpy, T, -1.0, 1.0)
    times = first_passage_times(
        p, eta, 1.0, dt=0.004, max_time=200.0, chains=3000, init=[-1.0], seed=4
    )
    assert torch.isfinite(times).all()
    m, se = estimate_mean(times)
    # discrete monitoring of the crossing biases the time up by O(sqrt(dt)); allow 2%
    _assert_z(m, np.hypot(se, 0.02 * exact), exact)
    assert round(mean_first_passage_time(p.loss_numpy, 0.1, -1.0, 1.0), 2) == 66.27


def test_state_dependent_diffusion_least_squares():
    # multiplicative noise in the SDE: E-M with dt small approaches the SGD excess loss to O(eta)
    h = np.array([1.0, 0.5])
    p = GaussianLeastSquares(h, 0.5)
    eta = 0.05
    R = 1000
    r = simulate_langevin(p, eta, 40.0, 0.025, R, diffusion="state", burn_in_time=10.0, seed=5)
    m, se = estimate_mean(r.excess_loss)
    slope = 0.25 * float(np.trace(p.noise_covariance))  # tr C / 4 at eta -> 0
    assert abs(m - slope * eta) < 4 * se + 0.2 * slope * eta
    rc = simulate_langevin(p, eta, 40.0, 0.025, R, burn_in_time=10.0, seed=5)
    assert rc.excess_loss.mean() < r.excess_loss.mean()  # constant C understates Sigma(Phi)


class _GenericQuadratic(Problem):
    """The same quadratic without the affine shortcut: forces the generic Euler-Maruyama step."""

    def __init__(self, q: Quadratic) -> None:
        self.q = q
        self.dim, self.hessian, self.optimum = q.dim, q.hessian, q.optimum
        self.noise_covariance, self.min_loss = q.noise_covariance, q.min_loss

    def loss(self, phi):
        return self.q.loss(phi)

    def grad(self, phi):
        return self.q.grad(phi)


@pytest.mark.parametrize(
    "H,C,pre",
    [
        (np.diag([1.0, 0.5]), np.diag([1.0, 2.0]), None),
        (np.array([[1.0, 0.3], [0.3, 0.5]]), np.array([[1.0, 0.2], [0.2, 2.0]]), None),
        (np.array([[1.0, 0.3], [0.3, 0.5]]), np.diag([1.0, 2.0]), "inverse_std"),
    ],
)
def test_fused_affine_step_equals_the_generic_step(H, C, pre):
    q = Quadratic(H, C, optimum=[0.5, -1.0])
    kw = dict(
        lr=0.3,
        time=5.0,
        dt=0.01,
        chains=7,
        init=[2.0, 1.0],
        preconditioner=pre,
        seed=3,
        record_every=100,
    )
    fast = simulate_langevin(q, **kw)
    slow = simulate_langevin(_GenericQuadratic(q), **kw)
    torch.testing.assert_close(fast.trajectory, slow.trajectory, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.second_moment, slow.second_moment, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=0.0), "lr"),
        (dict(dt=0.3), "time / dt"),
        (dict(diffusion="ito"), "diffusion"),
        (dict(burn_in_time=5.0), "burn_in_time"),
        (dict(preconditioner=[0.0]), "preconditioner"),
    ],
)
def test_bad_input_raises_with_named_parameter(kwargs, match):
    args = dict(problem=Quartic(), lr=0.1, time=1.0, dt=0.1, chains=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        simulate_langevin(**args)


def test_gibbs_expectations_on_a_wide_interval_find_a_narrow_mass():
    """A narrow mass far from the midpoint of a wide interval given by hand: the quadrature of
    expectations is told where the mode is (it returned 0 for E[x] and Var)."""
    from sgdlab.dynamics import GibbsDensity, langevin_stationary_density

    g = GibbsDensity(lambda x: 0.5 * (x - 37.0) ** 2, 1e-3, lower=-100.0, upper=100.0)
    assert g.expect(lambda x: x) == pytest.approx(37.0, rel=1e-10)
    assert g.variance() == pytest.approx(1e-3, rel=1e-8)
    p = langevin_stationary_density(
        lambda x: 0.5 * (x - 5.0) ** 2, lr=2e-4, sigma2=1.0, lower=-50, upper=50
    )
    assert p.expect(lambda x: x) == pytest.approx(5.0, rel=1e-10)


def test_zero_learning_rate_has_zero_stationary_covariance():
    """lr = 0 is allowed (lr >= 0): the O(lr) limit, 0, as quadratic_variance and
    ou_covariance give (the discrete Lyapunov solvers failed on the singular system)."""
    from sgdlab.dynamics import excess_loss, reshuffling_excess_loss, stationary_covariance

    assert stationary_covariance(1.0, 1.0, 0.0).tolist() == [[0.0]]
    assert excess_loss([[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], 0.0) == 0.0
    assert reshuffling_excess_loss(1.0, 1.0, 0.0, n=5) == 0.0
