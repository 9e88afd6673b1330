"""The lecture's variants against closed forms: eps inside the root, division by sigma^2,
per-example second moments (with weight decay and maximize), the 1/min(t, N) correction."""

from __future__ import annotations

import math

import pytest
import torch

import sgdlab

G = torch.tensor([0.3, -2.0, 1e-3, 5.0], dtype=torch.float64)


def _one_step(opt_cls, **kwargs):
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = opt_cls([p], **kwargs)
    p.grad = G.clone()
    opt.step()
    return p.detach()


@pytest.mark.parametrize("placement", ["outside", "inside"])
@pytest.mark.parametrize("power", [0.5, 1.0, 0.75])
def test_rmsprop_first_step_closed_form(placement, power):
    lr, alpha, eps = 0.01, 0.9, 1e-3
    got = _one_step(
        sgdlab.RMSProp, lr=lr, alpha=alpha, eps=eps, power=power, eps_placement=placement
    )
    s = (1 - alpha) * G * G
    denom = s**power + eps if placement == "outside" else (s + eps) ** power
    assert torch.allclose(got, -lr * G / denom, rtol=1e-14, atol=0)


@pytest.mark.parametrize("placement", ["outside", "inside"])
def test_adam_debiased_denominator_placement(placement):
    lr, eps = 0.1, 1e-2
    got = _one_step(sgdlab.Adam, lr=lr, eps=eps, eps_placement=placement)
    # After one step both debiased averages are exactly g and g^2.
    denom = G.abs() + eps if placement == "outside" else (G * G + eps).sqrt()
    assert torch.allclose(got, -lr * G / denom, rtol=1e-13, atol=0)


@pytest.mark.parametrize("bias", ["published", "lecture"])
def test_adam_first_step_is_a_sign_step(bias):
    got = _one_step(sgdlab.Adam, lr=0.5, eps=1e-12, bias_correction=bias)
    assert torch.allclose(got, -0.5 * torch.sign(G), rtol=1e-8, atol=0)


def test_lecture_correction_gives_exact_means_until_the_horizon():
    """1/min(t, N) weights: mu_t and s_t are the exact means of g and g^2 for t <= N
    (REFERENCE.md, running averages), and an EMA with weight 1/N after."""
    n_g, n_s = 8.0, 20.0
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = sgdlab.Adam([p], lr=1e-3, betas=(1 - 1 / n_g, 1 - 1 / n_s), bias_correction="lecture")
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(30)]
    mu = torch.zeros(4, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        st = opt.state[p]
        if t <= n_g:
            assert torch.allclose(st["exp_avg"], torch.stack(grads[:t]).mean(0), rtol=1e-13)
        if t <= n_s:
            assert torch.allclose(
                st["exp_avg_sq"], (torch.stack(grads[:t]) ** 2).mean(0), rtol=1e-13
            )
        mu = mu + (g - mu) / min(t, n_g)
        assert torch.allclose(st["exp_avg"], mu, rtol=1e-13)


def test_none_correction_keeps_the_bias_toward_zero():
    """Without correction, a constant gradient gives E mu_t = (1 - beta^t) g (mu_1 = g/N)."""
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    beta1 = 0.95
    opt = sgdlab.Adam([p], lr=1e-3, betas=(beta1, 0.999), bias_correction="none")
    for t in range(1, 11):
        p.grad = G.clone()
        opt.step()
        assert torch.allclose(opt.state[p]["exp_avg"], (1 - beta1**t) * G, rtol=1e-13)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_per_example_second_moment_with_weight_decay(maximize, wd):
    """The second moment is the batch mean of (s g_b + wd p)^2, brute force over examples."""
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    per = torch.randn(5, 3, 2, generator=gen, dtype=torch.float64)
    p = p0.clone().requires_grad_()
    alpha = 0.9
    opt = sgdlab.RMSProp(
        [p], lr=1e-2, alpha=alpha, weight_decay=wd, maximize=maximize, second_moment="per_example"
    )
    p.grad = per.mean(0)
    p.grad_second_moment = (per * per).mean(0)
    opt.step()
    sign = -1.0 if maximize else 1.0
    e = sign * per + wd * p0
    assert torch.allclose(
        opt.state[p]["square_avg"], (1 - alpha) * (e * e).mean(0), rtol=1e-14, atol=0
    )


def test_per_example_moment_is_batch_size_invariant_where_batch_moment_is_not():
    """E[mean_b g_b^2] = g^2 + sigma^2 at every B, E[g_hat^2] = g^2 + sigma^2/B (the lecture's
    'Scaling eta with batch size for RMSProp'): the first second-moment estimate of each."""
    gen = torch.Generator().manual_seed(2)
    mean, sigma, reps = 0.5, 2.0, 4000
    for b in (1, 4, 16):
        per = mean + sigma * torch.randn(reps, b, generator=gen, dtype=torch.float64)
        batch = per.mean(1) ** 2
        pex = (per**2).mean(1)
        for stat, want in ((batch, mean**2 + sigma**2 / b), (pex, mean**2 + sigma**2)):
            z = (stat.mean() - want) / (stat.std() / math.sqrt(reps))
            assert abs(z) < 4


def test_adamw_per_example_moment_has_no_decay_terms():
    """Decoupled (AdamW) decay is not part of the per-example gradients: the second moment is
    mean_b g_b^2 alone, while coupled L2 decay adds 2 wd p g_hat + wd^2 p^2."""
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(4, generator=gen, dtype=torch.float64)
    per = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    for decoupled in (False, True):
        p = p0.clone().requires_grad_()
        opt = sgdlab.Adam(
            [p],
            lr=1e-2,
            betas=(0.9, 0.99),
            weight_decay=0.2,
            decoupled_weight_decay=decoupled,
            second_moment="per_example",
            bias_correction="none",
        )
        p.grad = per.mean(0)
        p.grad_second_moment = (per * per).mean(0)
        opt.step()
        e = per if decoupled else per + 0.2 * p0
        assert torch.allclose(opt.state[p]["exp_avg_sq"], 0.01 * (e * e).mean(0), rtol=1e-14)
