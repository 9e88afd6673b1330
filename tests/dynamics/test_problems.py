"""Problems: brute-force autograd twins for gradients and Hessians, per-example gradients that
average to the full gradient, and the noise covariance C they declare."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgdlab.dynamics import (
    DoubleWell,
    GaussianLeastSquares,
    LogisticRegression,
    MeanEstimation,
    Quadratic,
    Quartic,
    Separable,
    estimate_mean,
    z_score,
)

torch.set_num_threads(1)

PROBLEMS = {
    "quadratic": lambda: Quadratic(
        [[1.0, 0.3], [0.3, 0.5]], [[2.0, 0.4], [0.4, 1.0]], optimum=[1.0, -1.0], min_loss=0.3
    ),
    "least_squares": lambda: GaussianLeastSquares([1.0, 0.5, 0.25], 0.5, optimum=[1, 2, 3]),
    "logistic": lambda: LogisticRegression.synthetic(100, 3, seed=1, l2=0.01),
    "mean_estimation": lambda: MeanEstimation(np.random.default_rng(0).standard_normal((30, 2))),
    "double_well": lambda: DoubleWell(0.7),
    "quartic": lambda: Quartic(1.3),
    "separable": lambda: Separable([1.0, 0.0], [1.0, 2.0], quartic=[0.5, 1.0]),
}


def _phi(problem, seed=0, R=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(R, problem.dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_gradient_and_hessian_vector_product_against_autograd(name):
    p = PROBLEMS[name]()
    phi = _phi(p).requires_grad_(True)
    (auto,) = torch.autograd.grad(p.loss(phi).sum(), phi, create_graph=True)
    torch.testing.assert_close(p.grad(phi.detach()), auto.detach(), rtol=1e-12, atol=1e-12)
    v = _phi(p, seed=1)
    (hv,) = torch.autograd.grad((auto * v).sum(), phi)
    torch.testing.assert_close(
        p.hessian_vector_product(phi.detach(), v), hv, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_optimum_hessian_and_min_loss(name):
    p = PROBLEMS[name]()
    x = torch.as_tensor(p.optimum).unsqueeze(0)
    torch.testing.assert_close(p.grad(x), torch.zeros_like(x), rtol=0, atol=1e-10)
    assert float(p.loss(x)[0]) == pytest.approx(p.min_loss, abs=1e-12)
    # Hessian at the optimum by autograd, column by column
    H = torch.autograd.functional.hessian(lambda z: p.loss(z.unsqueeze(0))[0], x[0].clone())
    np.testing.assert_allclose(H.numpy(), p.hessian, atol=1e-10)


@pytest.mark.parametrize("name", ["logistic", "mean_estimation"])
def test_finite_data_per_example_gradients(name):
    p = PROBLEMS[name]()
    phi = _phi(p, R=3)
    all_idx = torch.arange(p.n).expand(3, p.n)
    G = p.example_grads(phi, all_idx)
    torch.testing.assert_close(G.mean(1), p.grad(phi), rtol=1e-12, atol=1e-12)
    # each per-example gradient equals autograd of that example's loss (brute force)
    for i in (0, p.n - 1):
        z = phi[0].clone().requires_grad_(True)
        if name == "logistic":
            xi, yi = torch.as_tensor(p.inputs[i]), float(p.labels[i])
            li = torch.nn.functional.softplus(-yi * (xi @ z)) + 0.5 * p.l2 * (z @ z)
        else:
            li = 0.5 * ((z - torch.as_tensor(p.data[i])) ** 2).sum()
        (gi,) = torch.autograd.grad(li, z)
        torch.testing.assert_close(G[0, i], gi, rtol=1e-12, atol=1e-12)
    # C = (1/n) sum g_i g_i^T at the optimum, and the per-example gradients average to 0
    Go = p.example_grads(torch.as_tensor(p.optimum).unsqueeze(0), all_idx[:1])[0].numpy()
    np.testing.assert_allclose(Go.mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(Go.T @ Go / p.n, p.noise_covariance, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "name", ["quadratic", "least_squares", "double_well", "separable", "logistic"]
)
def test_sampled_gradients_have_the_declared_mean_and_covariance(name):
    p = PROBLEMS[name]()
    R, B = 20000, 4
    phi = torch.as_tensor(p.optimum).expand(R, p.dim).clone()
    gen = torch.Generator().manual_seed(3)
    ex = p.sample_example_grads(phi, B, gen)  # (R, B, d)
    flat = ex.reshape(R * B, p.dim)
    m, se = estimate_mean(flat)
    assert np.all(np.abs(z_score(m, se, 0.0)) < 4)
    outer = (flat.unsqueeze(-1) * flat.unsqueeze(-2)).reshape(R * B, -1)
    m, se = estimate_mean(outer)
    ok = se > 0
    assert np.all(np.abs(z_score(m[ok], se[ok], p.noise_covariance.reshape(-1)[ok])) < 4)
    # the batch-mean shortcut has covariance C / B
    gh = p.sample_grad(phi, B, gen)
    m, se = estimate_mean((gh.unsqueeze(-1) * gh.unsqueeze(-2)).reshape(R, -1))
    ok = se > 0
    assert np.all(np.abs(z_score(m[ok], se[ok], p.noise_covariance.reshape(-1)[ok] / B)) < 4)


def test_least_squares_state_dependent_covariance():
    p = PROBLEMS["least_squares"]()
    R = 40000
    phi = (torch.as_tensor(p.optimum) + torch.tensor([0.5, -0.3, 0.2])).expand(R, 3).clone()
    ex = p.sample_example_grads(phi, 1, torch.Generator().manual_seed(4))[:, 0]
    dev = ex - p.grad(phi)
    m, se = estimate_mean((dev.unsqueeze(-1) * dev.unsqueeze(-2)).reshape(R, -1))
    Sig = p.gradient_covariance(phi[:1])[0].reshape(-1).numpy()
    assert np.all(np.abs(z_score(m, se, Sig)) < 4)
    np.testing.assert_allclose(
        p.gradient_covariance(torch.as_tensor(p.optimum)[None])[0], p.noise_covariance, atol=1e-14
    )


def test_mean_estimation_standardized_and_logistic_separable_data():
    p = MeanEstimation.standardized(50, 2.0, dim=2, seed=1)
    np.testing.assert_allclose(p.optimum, 0.0, atol=1e-14)
    np.testing.assert_allclose(p.noise_covariance, 4.0 * np.eye(2), atol=1e-12)
    X = np.array([[1.0], [2.0], [-1.0], [-2.0]])
    with pytest.raises(ValueError, match="separable"):
        LogisticRegression(X, [1, 1, 0, 0])
    q = LogisticRegression(X, [1, 1, 0, 0], l2=0.1)
    assert np.isfinite(q.optimum).all()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: Quadratic([[1.0, 0.0], [0.0, -1.0]], 1.0), "hessian"),
        (lambda: Quadratic(1.0, [[1.0, 0.0], [0.0, 1.0]]), "noise_covariance"),
        (lambda: GaussianLeastSquares([1.0], -0.5), "noise_variance"),
        (lambda: MeanEstimation([1.0]), "n >= 2"),
        (lambda: LogisticRegression(np.ones((3, 1)), [0, 1, 2]), "labels"),
        (lambda: Separable([0.0], [1.0]), "confining"),
        (lambda: DoubleWell(0.0), "noise_std"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
