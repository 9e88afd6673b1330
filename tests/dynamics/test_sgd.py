"""SGD chains against exact stationary laws (REFERENCE.md protocol: R chains, time averages,
standard errors across chains, |z| < 4, seeded, start at the stationary law when known)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgdlab.dynamics import (
    GaussianLeastSquares,
    MeanEstimation,
    Quadratic,
    Separable,
    estimate_excess_from_fdr,
    estimate_mean,
    estimate_temperatures,
    excess_loss,
    excess_loss_slope,
    fit_excess_slope,
    heavy_ball_variance,
    least_squares_excess_loss,
    lr_drop_second_moment,
    momentum_stationary_covariance,
    quadratic_variance,
    reshuffling_excess_loss,
    simulate_sgd,
    stationary_covariance,
    z_score,
)

torch.set_num_threads(1)


def _stationary_init(S: np.ndarray, chains: int, seed: int, center=None) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.multivariate_normal(np.zeros(S.shape[0]), S, size=chains)
    return torch.as_tensor(x if center is None else x + center)


def _assert_z(estimate: float, stderr: float, reference: float) -> None:
    z = z_score(estimate, stderr, reference)
    assert abs(z) < 4, f"estimate {estimate} ± {stderr} vs exact {reference}: z = {z:.2f}"


@pytest.mark.parametrize("eta", [0.01, 0.1, 0.5, 1.0])
def test_one_dimensional_quadratic_excess_loss(eta):
    p = Quadratic(1.0, 1.0)
    V = quadratic_variance(1.0, eta)
    steps = max(400, int(20 / eta))
    r = simulate_sgd(
        p, eta, 1, steps, 2000, init=_stationary_init(np.array([[V]]), 2000, 1), seed=2
    )
    _assert_z(*estimate_mean(r.excess_loss), excess_loss(1.0, 1.0, eta))
    # the fluctuation-dissipation identity: excess = (eta / 4) E ||g_hat||^2, exact
    _assert_z(*estimate_mean(r.excess_loss - eta / 4 * r.grad_sq), 0.0)


def test_two_dimensional_quadratic_covariance_and_fdr_with_batches():
    H = np.array([[1.0, 0.3], [0.3, 0.5]])
    C = np.array([[2.0, -0.4], [-0.4, 1.0]])
    eta, B = 0.3, 4
    p = Quadratic(H, C, optimum=[1.0, -2.0], min_loss=0.7)
    S = stationary_covariance(H, C, eta, B)
    r = simulate_sgd(p, eta, B, 1500, 2000, init=_stationary_init(S, 2000, 3, p.optimum), seed=4)
    m, se = estimate_mean(r.second_moment.reshape(2000, 4))
    for k in range(4):
        _assert_z(m[k], se[k], S.reshape(-1)[k])
    _assert_z(*estimate_mean(r.excess_loss), excess_loss(H, C, eta, B))
    _assert_z(*estimate_mean(2 * r.excess_loss - r.fdr_lhs), 0.0)
    _assert_z(*estimate_excess_from_fdr(r.grad_sq, eta), excess_loss(H, C, eta, B))
    _assert_z(*estimate_mean(r.fdr_lhs - eta / 2 * r.grad_sq), 0.0)


@pytest.mark.parametrize("B,eta,value", [(1, 0.05, 0.012945), (4, 0.4, 0.032879)])
def test_least_squares_multiplicative_noise(B, eta, value):
    h = np.array([1, 0.5, 0.25, 0.1, 0.05])
    p = GaussianLeastSquares(h, 0.5)
    A = np.sum(eta * h / (B * (2 - eta * (1 + 1 / B) * h)))
    X = 0.5 * A / (1 - A)
    s = eta * (X + 0.5) / (B * (2 - eta * (1 + 1 / B) * h))  # exact stationary diagonal
    R = 1000
    steps = 1500 if eta > 0.1 else 4000
    r = simulate_sgd(p, eta, B, steps, R, init=_stationary_init(np.diag(s), R, 5), seed=6)
    _assert_z(*estimate_mean(r.excess_loss), value)
    assert least_squares_excess_loss(h, 0.5, eta, B) == pytest.approx(value, abs=5e-7)


def test_random_reshuffling_excess_loss():
    p = MeanEstimation.standardized(50, 1.0, seed=0)
    ref = reshuffling_excess_loss(1.0, 1.0, 0.01, 50)
    assert ref == pytest.approx(0.00038035, abs=5e-9)
    # start at the epoch-boundary stationary covariance (second moments then exact throughout)
    from sgdlab.dynamics import reshuffling_covariances

    S0 = reshuffling_covariances(1.0, 1.0, 0.01, 50)[0]
    R = 1000
    r = simulate_sgd(
        p,
        0.01,
        1,
        50 * 60,
        R,
        sampling="reshuffle",
        init=_stationary_init(S0, R, 7, p.optimum),
        seed=8,
    )
    m, se = estimate_mean(r.excess_loss)
    _assert_z(m, se, ref)
    assert m < 0.25 * excess_loss(1.0, 1.0, 0.01)  # far below sampling with replacement


def test_with_replacement_from_a_finite_data_set():
    p = MeanEstimation.standardized(50, 1.0, seed=1)
    V = quadratic_variance(1.0, 0.2, 1.0, 2)
    r = simulate_sgd(
        p, 0.2, 2, 1500, 2000, init=_stationary_init(np.array([[V]]), 2000, 9, p.optimum), seed=10
    )
    _assert_z(*estimate_mean(r.excess_loss), excess_loss(1.0, 1.0, 0.2, 2))


def test_reshuffled_batch_gradient_covers_each_example_once_per_epoch():
    p = MeanEstimation(np.arange(12.0))
    # one epoch at the optimum: the batch gradients of a permutation sum to zero, so with a
    # tiny lr the chain returns to the optimum up to O(lr^2)
    r = simulate_sgd(p, 1e-4, 3, 4, 5, sampling="reshuffle", seed=0)
    assert torch.allclose(r.final, torch.full((5, 1), 5.5, dtype=torch.float64), atol=1e-6)
    r = simulate_sgd(p, 1e-4, 3, 4, 5, sampling="replacement", seed=0)
    assert not torch.allclose(r.final, torch.full((5, 1), 5.5, dtype=torch.float64), atol=1e-6)
    # batch variance of one reshuffled batch: (sigma^2/B)(n-B)/(n-1), averaged over an epoch
    grads = []
    gen = torch.Generator().manual_seed(0)
    phi = torch.full((4000, 1), 5.5, dtype=torch.float64)
    perm = torch.argsort(torch.rand(4000, 12, generator=gen), dim=1)
    for j in range(4):
        grads.append(p.example_grads(phi, perm[:, 3 * j : 3 * j + 3]).mean(1)[:, 0])
    G = torch.stack(grads, 1)
    assert torch.allclose(G.sum(1), torch.zeros(4000, dtype=torch.float64), atol=1e-12)
    s2 = float(np.var(np.arange(12.0)))
    _assert_z(*estimate_mean((G**2).mean(1)), s2 / 3 * 9 / 11)


@pytest.mark.parametrize("beta,eta", [(0.9, 0.01), (0.5, 0.5)])
def test_momentum_heavy_ball_variance(beta, eta):
    Ng = 1.0 / (1.0 - beta)
    p = Quadratic(1.0, 1.0)
    S = momentum_stationary_covariance(1.0, 1.0, eta, Ng)
    R = 2000
    x = _stationary_init(S, R, 11)
    steps = 3000 if eta < 0.1 else 600
    r = simulate_sgd(
        p, eta, 1, steps, R, init=x[:, :1], init_momentum=x[:, 1:], momentum_horizon=Ng, seed=12
    )
    _assert_z(*estimate_mean(r.variance[:, 0]), heavy_ball_variance(1.0, eta, beta))


def test_momentum_forms_identical_to_torch_sgd_in_float64():
    y = np.random.default_rng(0).standard_normal((40, 2)) * [1.0, 2.0] + [0.5, -1.0]
    p = MeanEstimation(y)  # per-example sampling through the problem: replayable draws
    beta, B, steps = 0.8, 3, 40
    schedule = lambda t: 0.1 / (1 + t / 10)  # noqa: E731
    r = simulate_sgd(
        p, schedule, B, steps, 4, init=[2.0, 1.0], momentum_horizon=5.0, seed=3, record_every=1
    )
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.tensor([[2.0, 1.0]] * 4, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.1, momentum=beta, dampening=0.0)
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = schedule(t)
        w.grad = p.sample_grad(w.detach(), B, gen)
        opt.step()
        assert torch.allclose(r.trajectory[t + 1], w.detach(), rtol=0, atol=1e-13)


def test_sgdlab_schedule_object_drives_the_simulator():
    schedules = pytest.importorskip("sgdlab.schedules")
    sched = schedules.StepDrops(0.2, milestones=[5], factor=10.0)
    r = simulate_sgd(Quadratic(1.0, 1.0), sched, 1, 10, 2, record_every=1)
    np.testing.assert_allclose(r.times.numpy(), np.cumsum([0] + [sched(t) for t in range(10)]))


def test_learning_rate_drop_relaxation_curve():
    eta_old, eta_new, h = 0.4, 0.04, 1.0
    V_old = quadratic_variance(h, eta_old)
    R, steps = 4000, 60
    r = simulate_sgd(
        Quadratic(h, 1.0),
        lambda t: eta_new,
        1,
        steps,
        R,
        init=_stationary_init(np.array([[V_old]]), R, 13),
        record_every=10,
        statistics=False,
        seed=14,
    )
    exact = lr_drop_second_moment(r.record_steps.numpy(), h, eta_old, eta_new)
    for k in range(len(r.record_steps)):
        _assert_z(*estimate_mean(r.trajectory[k, :, 0] ** 2), exact[k])
    assert exact[-1] < 0.5 * V_old


def test_slope_of_converged_loss_fitted_from_several_eta():
    C = np.diag([1.0, 0.5])
    H = np.diag([1.0, 0.4])
    B = 2
    p = Quadratic(H, C)
    lrs = [0.1, 0.2, 0.4, 0.6]
    means, ses = [], []
    for i, eta in enumerate(lrs):
        S = stationary_covariance(H, C, eta, B)
        r = simulate_sgd(p, eta, B, 1000, 1500, init=_stationary_init(S, 1500, 20 + i), seed=i)
        m, se = estimate_mean(r.excess_loss)
        means.append(m)
        ses.append(se)
    slope, se = fit_excess_slope(lrs, means, ses, degree=3)
    _assert_z(slope, se, excess_loss_slope(C, B))
    assert se < 0.15 * excess_loss_slope(C, B)


@pytest.mark.parametrize("kind", ["inverse_variance", "inverse_std"])
def test_per_coordinate_temperatures(kind):
    sigma = np.array([1.0, 3.0])
    h = np.array([1.0, 0.5])
    p = Separable(h, sigma)
    eta_p = 0.05
    P = 1 / sigma**2 if kind == "inverse_variance" else 1 / sigma
    etas = eta_p * P
    V = etas * sigma**2 / (h * (2 - etas * h))
    R = 2000
    init = _stationary_init(np.diag(V), R, 30)
    r = simulate_sgd(
        p,
        eta_p,
        1,
        2500,
        R,
        init=init,
        preconditioner=kind,
        observables=estimate_temperatures.observables(p),
        seed=31,
    )
    T, se = estimate_temperatures(r)
    exact = etas * sigma**2 / (2 - etas * h)
    for i in range(2):
        _assert_z(T[i], se[i], exact[i])
    if kind == "inverse_variance":
        assert exact[0] == pytest.approx(exact[1], rel=0.05)  # one temperature: Gibbs
    else:
        np.testing.assert_allclose(exact, eta_p * sigma / 2, rtol=0.05)  # T_i = eta' sigma_i/2


def test_rmsprop_preconditioner_against_a_per_chain_reference_loop():
    from sgdlab.dynamics import RMSPropPreconditioner

    p = MeanEstimation(np.random.default_rng(1).standard_normal((40, 2)) * [1.0, 3.0])
    for q in ("batch", "per_example"):
        for place, power in (("outside", 0.5), ("inside", 1.0)):
            pre = RMSPropPreconditioner(
                horizon=10, eps=1e-3, power=power, eps_placement=place, second_moment=q
            )
            r = simulate_sgd(
                p,
                0.05,
                2,
                30,
                3,
                init=[1.0, -1.0],
                preconditioner=pre,
                momentum_horizon=2.0,
                seed=5,
                record_every=1,
            )
            # reference: a slow per-coordinate loop replaying the same draws
            gen = torch.Generator().manual_seed(5)
            phi = torch.tensor([[1.0, -1.0]] * 3, dtype=torch.float64)
            mu = torch.zeros(3, 2, dtype=torch.float64)
            s = torch.zeros(3, 2, dtype=torch.float64)
            for t in range(30):
                if q == "per_example":
                    ex = p.sample_example_grads(phi, 2, gen)
                    g, qq = ex.mean(1), (ex**2).mean(1)
                else:
                    g = p.sample_grad(phi, 2, gen)
                    qq = g**2
                new = phi.clone()
                for c in range(3):
                    for i in range(2):
                        k = 1.0 / min(t + 1, 10)
                        s[c, i] = (1 - k) * s[c, i] + k * qq[c, i]
                        mu[c, i] = 0.5 * mu[c, i] + 0.5 * g[c, i]
                        den = (
                            s[c, i].sqrt() + 1e-3
                            if place == "outside"
                            else (s[c, i] + 1e-3) ** power
                        )
                        new[c, i] = phi[c, i] - 2.0 * 0.05 * mu[c, i] / den
                phi = new
                assert torch.allclose(r.trajectory[t + 1], phi, rtol=0, atol=1e-12)


class _NoShortcutQuadratic(Quadratic):
    """Same quadratic, gradient through grad() instead of the fused affine step."""

    def affine_gradient(self, dtype=torch.float64):
        return None


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(momentum_horizon=4.0),
        dict(preconditioner=[1.0, 0.5], lr=lambda t: 0.1 / (1 + t)),
    ],
)
def test_fused_affine_gradient_equals_generic_gradient_pathwise(kw):
    H, C = [[1.0, 0.3], [0.3, 0.5]], [[1.0, 0.2], [0.2, 2.0]]
    args = dict(lr=0.2, batch_size=3, steps=300, chains=5, init=[2.0, 1.0], record_every=50, seed=4)
    args.update(kw)
    fast = simulate_sgd(Quadratic(H, C, optimum=[0.5, -1.0]), **args)
    slow = simulate_sgd(_NoShortcutQuadratic(H, C, optimum=[0.5, -1.0]), **args)
    torch.testing.assert_close(fast.trajectory, slow.trajectory, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.grad_sq, slow.grad_sq, rtol=1e-12, atol=0)


def test_learning_rate_zero_is_a_no_op_and_seeds_reproduce():
    p = Quadratic([1.0, 2.0], [1.0, 1.0])
    r = simulate_sgd(p, 0.0, 1, 20, 3, init=[0.3, 0.4])
    assert torch.equal(r.final, torch.tensor([[0.3, 0.4]] * 3, dtype=torch.float64))
    a = simulate_sgd(p, 0.1, 2, 50, 7, seed=9)
    b = simulate_sgd(p, 0.1, 2, 50, 7, seed=9)
    c = simulate_sgd(p, 0.1, 2, 50, 7, seed=10)
    assert torch.equal(a.final, b.final) and not torch.equal(a.final, c.final)
    f32 = simulate_sgd(p, 0.1, 2, 50, 7, seed=9, dtype=torch.float32)
    assert f32.final.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-0.1), "lr"),
        (dict(lr=lambda t: float("nan")), "schedule"),
        (dict(batch_size=0), "batch_size"),
        (dict(steps=0), "steps"),
        (dict(chains=2.5), "chains"),
        (dict(sampling="shuffle"), "sampling"),
        (dict(sampling="reshuffle"), "finite data set"),
        (dict(momentum_horizon=0.5), "momentum_horizon"),
        (dict(init_momentum=[0.0, 0.0]), "init_momentum"),
        (dict(preconditioner=[1.0, -1.0]), "preconditioner"),
        (dict(preconditioner="adam"), "preconditioner"),
        (dict(burn_in=10), "burn_in"),
        (dict(init=[1.0, 2.0, 3.0]), "init"),
        (dict(dtype=torch.int64), "dtype"),
    ],
)
def test_bad_input_raises_with_named_parameter(kwargs, match):
    args = dict(problem=Quadratic([1.0, 2.0], [1.0, 1.0]), lr=0.1, batch_size=1, steps=10, chains=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        simulate_sgd(**args)


def test_divergence_raises_instead_of_nan():
    with pytest.raises(FloatingPointError, match="stability"):
        simulate_sgd(Quadratic(1.0, 1.0), 2.5, 1, 2000, 2, init=[1.0])
