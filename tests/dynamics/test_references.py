"""Exact references against REFERENCE.md's values and against independent derivations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.linalg import expm

from sgdlab.dynamics import (
    GibbsDensity,
    batch_gradient_variance,
    coordinate_temperatures,
    excess_loss,
    excess_loss_slope,
    heavy_ball_variance,
    langevin_stationary_density,
    least_squares_excess_loss,
    lr_drop_second_moment,
    mean_first_passage_time,
    momentum_stationary_covariance,
    ou_covariance,
    quadratic_excess_loss,
    quadratic_variance,
    reshuffling_covariances,
    reshuffling_excess_loss,
    stationary_covariance,
)

H4 = np.diag([1.0, 0.5, 0.25, 0.1])
C4 = np.array(
    [[1.0, 0.3, 0.0, 0.1], [0.3, 0.8, 0.2, 0.0], [0.0, 0.2, 0.5, 0.1], [0.1, 0.0, 0.1, 0.4]]
)


@pytest.mark.parametrize(
    "eta,value", [(0.01, 0.0025126), (0.1, 0.0263158), (0.5, 0.166667), (1.0, 0.5)]
)
def test_one_dimensional_excess_loss_values(eta, value):
    assert quadratic_excess_loss(1.0, eta) == pytest.approx(value, abs=5e-7)
    assert excess_loss(1.0, 1.0, eta) == pytest.approx(quadratic_excess_loss(1.0, eta), rel=1e-12)


def test_discrete_lyapunov_solves_its_equation_and_matches_1d_formula():
    S = stationary_covariance(H4, C4, 0.4, 3)
    A = np.eye(4) - 0.4 * H4
    np.testing.assert_allclose(S, A @ S @ A.T + 0.16 * C4 / 3, atol=1e-14)
    assert stationary_covariance(2.0, 3.0, 0.3, 2)[0, 0] == pytest.approx(
        quadratic_variance(2.0, 0.3, 3.0, 2), rel=1e-12
    )


def test_lyapunov_matches_the_series_sum():
    # S = sum_k A^k (eta^2 C/B) A^k^T, summed directly
    eta, B = 0.3, 2
    A = np.eye(4) - eta * H4
    S, term = np.zeros((4, 4)), eta**2 * C4 / B
    for _ in range(4000):
        S += term
        term = A @ term @ A.T
    np.testing.assert_allclose(stationary_covariance(H4, C4, eta, B), S, rtol=1e-10)


def test_slope_at_zero_is_trace_c_over_4b_for_any_hessian():
    for H in (H4, np.diag([3.0, 0.2, 1.0, 0.7])):
        for B in (1, 4):
            eps = 1e-5
            fd = (excess_loss(H, C4, eps, B) - excess_loss(H, C4, 0.0 + eps / 2, B)) / (eps / 2)
            assert fd == pytest.approx(excess_loss_slope(C4, B), rel=1e-4)
    assert excess_loss_slope(C4, 4) == pytest.approx(np.trace(C4) / 16)


def test_ou_covariance_understates_discrete_by_order_eta():
    ratios = []
    for eta in (0.4, 0.2, 0.1, 0.05):
        S_ou = ou_covariance(H4, C4, eta, 1)
        np.testing.assert_allclose(H4 @ S_ou + S_ou @ H4, eta * C4, atol=1e-14)
        exact = excess_loss(H4, C4, eta)
        ou = 0.5 * np.trace(H4 @ S_ou)
        assert ou < exact
        ratios.append((exact - ou) / exact)
        # identity: tr(H S) = tr(H S + S H)/2 = eta tr C / 2, so the OU excess is exactly the
        # first-order term eta tr C / (4B) for every H
        assert ou == pytest.approx(eta * excess_loss_slope(C4), rel=1e-12)
    # relative gap is O(eta): halves with eta
    np.testing.assert_allclose(np.array(ratios[:-1]) / np.array(ratios[1:]), 2.0, rtol=0.1)


@pytest.mark.parametrize("beta,eta,value", [(0.9, 0.01, 0.050132), (0.5, 0.5, 0.6)])
def test_heavy_ball_variance(beta, eta, value):
    assert heavy_ball_variance(1.0, eta, beta) == pytest.approx(value, abs=5e-7)
    S = momentum_stationary_covariance(1.0, 1.0, eta, 1.0 / (1.0 - beta))
    assert S[0, 0] == pytest.approx(heavy_ball_variance(1.0, eta, beta), rel=1e-10)


def test_momentum_conjugacy_first_order():
    # eta = eta'/N_g: heavy-ball variance equals plain SGD at eta' to first order in eta'
    for eta_p in (1e-2, 5e-3):
        hb = heavy_ball_variance(1.0, eta_p / 10, 0.9)
        plain = quadratic_variance(1.0, eta_p)
        assert abs(hb / plain - 1) < 2 * eta_p


def test_momentum_lyapunov_general_matrix_form():
    S = momentum_stationary_covariance(H4, C4, 0.05, 5.0, 2)
    assert S.shape == (8, 8)
    assert np.all(np.linalg.eigvalsh(S) > -1e-15)
    with pytest.raises(ValueError, match="unstable"):
        momentum_stationary_covariance(1.0, 1.0, 4.0, 2.0)


@pytest.mark.parametrize("B,eta,value", [(1, 0.05, 0.012945), (4, 0.4, 0.032879)])
def test_least_squares_gaussian_inputs(B, eta, value):
    assert least_squares_excess_loss([1, 0.5, 0.25, 0.1, 0.05], 0.5, eta, B) == pytest.approx(
        value, abs=5e-7
    )


def test_least_squares_fixed_point_of_second_moment_recursion():
    # s_k' = s_k (1 - 2 eta h_k + eta^2 h_k^2 (1 + 1/B)) + eta^2 h_k (sum h s + s2)/B, iterated
    h, s2, eta, B = np.array([1, 0.5, 0.25, 0.1, 0.05]), 0.5, 0.4, 4
    s = np.zeros(5)
    for _ in range(20000):
        s = s * (1 - 2 * eta * h + eta**2 * h**2 * (1 + 1 / B)) + eta**2 * h * (h @ s + s2) / B
    assert 0.5 * h @ s == pytest.approx(least_squares_excess_loss(h, s2, eta, B), rel=1e-10)


def test_reshuffling_reference_value_and_with_replacement_value():
    assert reshuffling_excess_loss(1.0, 1.0, 0.01, 50) == pytest.approx(0.00038035, abs=5e-9)
    assert excess_loss(1.0, 1.0, 0.01) == pytest.approx(0.00251256, abs=5e-9)


def _brute_force_reshuffling(H, Z, eta, B):
    """Average over every permutation of the epoch map, exactly (small n)."""
    n, d = Z.shape
    M = n // B
    A = np.eye(d) - eta * H
    perms = list(itertools.permutations(range(n)))
    # noise after m steps for each permutation: sum_j A^{m-1-j} eta * mean(batch j)
    covs = []
    for m in range(M + 1):
        acc = np.zeros((d, d))
        for p in perms:
            v = np.zeros(d)
            for j in range(m):
                v = A @ v + eta * Z[list(p[j * B : (j + 1) * B])].mean(axis=0)
            acc += np.outer(v, v)
        covs.append(acc / len(perms))
    AM = np.linalg.matrix_power(A, M)
    S0 = np.zeros((d, d))
    for _ in range(5000):
        S0 = AM @ S0 @ AM.T + covs[M]
    return np.stack(
        [
            np.linalg.matrix_power(A, m) @ S0 @ np.linalg.matrix_power(A, m).T + covs[m]
            for m in range(M)
        ]
    )


@pytest.mark.parametrize("B", [1, 2])
def test_reshuffling_covariances_against_enumeration_of_permutations(B):
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((6, 2))
    Z -= Z.mean(axis=0)
    C = Z.T @ Z / 6
    H = np.array([[1.0, 0.2], [0.2, 0.6]])
    got = reshuffling_covariances(H, C, 0.3, 6, B)
    np.testing.assert_allclose(got, _brute_force_reshuffling(H, Z, 0.3, B), rtol=1e-9, atol=1e-14)


def test_reshuffling_tends_to_with_replacement_for_long_epochs_and_slope_zero():
    # epoch much longer than the relaxation time: each step sees nearly iid noise
    rr = reshuffling_excess_loss(1.0, 1.0, 0.2, 5000)
    assert rr == pytest.approx(excess_loss(1.0, 1.0, 0.2), rel=2e-3)
    # slope at eta = 0 vanishes (fixed n): excess/eta -> 0
    r1 = reshuffling_excess_loss(1.0, 1.0, 1e-3, 50) / 1e-3
    r2 = reshuffling_excess_loss(1.0, 1.0, 5e-4, 50) / 5e-4
    assert r2 < 0.6 * r1 and r1 < 0.1 * excess_loss_slope(1.0)


def test_batch_gradient_variance_without_replacement():
    assert batch_gradient_variance(2.0, 4) == 0.5
    assert batch_gradient_variance(2.0, 4, n=10) == pytest.approx(0.5 * 6 / 9)
    # one reshuffled epoch's batch: the block covariance formula with one block
    Z = np.arange(10.0) - 4.5
    s2 = Z.var()
    exact = np.mean([Z[list(c)].mean() ** 2 for c in itertools.combinations(range(10), 4)])
    assert exact == pytest.approx(batch_gradient_variance(s2, 4, n=10), rel=1e-12)


def test_mean_first_passage_time_double_well():
    L = lambda x: (x**2 - 1) ** 2 / 4  # noqa: E731
    assert round(mean_first_passage_time(L, 0.1, -1.0, 1.0), 2) == 66.27
    assert mean_first_passage_time(L, 0.1, 1.0, -1.0) == pytest.approx(
        mean_first_passage_time(L, 0.1, -1.0, 1.0), rel=1e-10
    )


def test_mean_first_passage_time_flat_potential_closed_form():
    # Brownian motion with reflection at 0: tau(0 -> b) = b^2 / (2T)
    assert mean_first_passage_time(lambda x: 0 * x, 0.3, 0.0, 1.5, barrier=0.0) == pytest.approx(
        1.5**2 / 0.6, rel=1e-9
    )


def test_gibbs_density_normalised_and_quartic_equipartition():
    p = langevin_stationary_density(lambda x: x**4 / 4, lr=0.2, sigma2=2.0, batch_size=4)
    T = 0.2 * 2.0 / 8
    assert p.temperature == pytest.approx(T)
    assert p.expect(lambda x: 1.0 + 0 * x) == pytest.approx(1.0, rel=1e-10)
    assert p.expect(lambda x: x**4 / 4) == pytest.approx(T / 4, rel=1e-9)
    g = GibbsDensity(lambda x: 0.5 * 3.0 * x**2, 0.7)
    assert g.variance() == pytest.approx(0.7 / 3.0, rel=1e-9)
    assert float(g.cdf(0.0)) == pytest.approx(0.5, abs=1e-9)


def test_coordinate_temperatures():
    sig2 = np.array([1.0, 9.0])
    T = coordinate_temperatures([1, 1], sig2, 0.02 / sig2, exact=False)
    np.testing.assert_allclose(T, [0.01, 0.01])
    T = coordinate_temperatures([1, 1], sig2, 0.02 / np.sqrt(sig2), exact=False)
    np.testing.assert_allclose(T, 0.02 * np.sqrt(sig2) / 2)
    Te = coordinate_temperatures([2.0, 0.5], sig2, [0.1, 0.01], batch_size=2)
    np.testing.assert_allclose(
        Te,
        [2.0, 0.5]
        * np.array([quadratic_variance(2.0, 0.1, 1.0, 2), quadratic_variance(0.5, 0.01, 9.0, 2)]),
    )


def test_lr_drop_curve_matches_the_recursion():
    # E e^2 after the drop follows v' = (1 - eta h)^2 v + eta^2 sigma^2 / B exactly
    v = quadratic_variance(0.8, 0.5, 1.5, 2)
    curve = lr_drop_second_moment(np.arange(30), 0.8, 0.5, 0.05, 1.5, 2)
    for t in range(30):
        assert curve[t] == pytest.approx(v, rel=1e-12)
        v = (1 - 0.05 * 0.8) ** 2 * v + 0.05**2 * 1.5 / 2


def test_gradient_flow_ratio_formula():
    # GD/flow per mode: (1 - eta h)^k / exp(-eta h k) = exp(-eta h^2 t/2 + O(eta^2 t))
    h, eta, k = 0.7, 1e-3, 2000
    t = eta * k
    ratio = (1 - eta * h) ** k / np.exp(-eta * h * k)
    assert ratio == pytest.approx(np.exp(-eta * h**2 * t / 2), rel=1e-5)
    assert expm(-np.array([[h]]) * t)[0, 0] == pytest.approx(np.exp(-h * t))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: stationary_covariance(1.0, 1.0, 2.5), "unstable"),
        (lambda: stationary_covariance([[1, 2], [0, 1]], 1.0, 0.1), "symmetric"),
        (lambda: stationary_covariance(1.0, -1.0, 0.1), "positive semi-definite"),
        (lambda: excess_loss(1.0, 1.0, 0.1, batch_size=0), "batch_size"),
        (lambda: quadratic_variance(1.0, -0.1), "lr"),
        (lambda: least_squares_excess_loss([1.0], 0.5, 1.5, 1), "unstable"),
        (lambda: reshuffling_excess_loss(1.0, 1.0, 0.1, n=4, batch_size=5), "batch_size"),
        (lambda: mean_first_passage_time(lambda x: x, -1.0, 0.0, 1.0), "temperature"),
        (lambda: heavy_ball_variance(1.0, 0.1, 1.0), "beta"),
    ],
)
def test_bad_input_raises_with_named_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()
