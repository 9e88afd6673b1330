"""Batch-size scaling inside the optimizers: B = B0 is a no-op, every rule applies
sgdlab.hyper's algebra, the state carries over batch-size changes, schedulers compose."""

from __future__ import annotations

import pytest
import torch

import sgdlab
from sgdlab import hyper

from .cases import make_params, set_grads

ALL = [
    (sgdlab.SGD, dict(lr=0.03, momentum=0.9), "heavy_ball"),
    (sgdlab.RMSProp, dict(lr=0.01, momentum=0.5, alpha=0.95, eps=1e-6), "heavy_ball"),
    (sgdlab.Adam, dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6), "ema"),
]


def _run(opt, params, steps, batch_sizes=None, start=0):
    for t in range(start, start + steps):
        set_grads(params, t)
        if batch_sizes is None:
            opt.step()
        else:
            opt.step(batch_size=batch_sizes[t % len(batch_sizes)])


@pytest.mark.parametrize("cls,kwargs,form", ALL)
def test_equal_batch_sizes_change_nothing(cls, kwargs, form):
    p1, p2 = make_params(3), make_params(3)
    plain = cls(p1, **kwargs)
    scaled = cls(p2, batch_size=32, ref_batch_size=32, scaling="lecture", **kwargs)
    _run(plain, p1, 40)
    _run(scaled, p2, 40, [32])
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule", hyper.RULES)
@pytest.mark.parametrize("cls,kwargs,form", ALL)
def test_effective_hyperparameters_follow_hyper(cls, kwargs, form, rule):
    opt = cls(make_params(0), ref_batch_size=8, batch_size=128, scaling=rule, **kwargs)
    hp = opt.effective_hyperparameters(opt.param_groups[0])
    base = opt._hyper_of(opt.param_groups[0])
    want = hyper.rescale(base, 8, 128, rule, form)
    assert hp["lr"] == want.lr
    if cls is sgdlab.Adam:
        assert hp["betas"] == (want.beta1, want.beta2)
    else:
        assert hp["momentum"] == want.beta1
    if cls is not sgdlab.SGD:
        assert hp["eps"] == want.eps


def test_linear_rule_doubles_the_step():
    """At B = 2 B0 under the linear rule, sgdlab.SGD is torch.optim.SGD with 2 lr."""
    p1, p2 = make_params(4), make_params(4)
    ours = sgdlab.SGD(p1, lr=0.01, momentum=0.9, ref_batch_size=16, batch_size=32)
    theirs = torch.optim.SGD(p2, lr=0.02, momentum=0.9)
    _run(ours, p1, 50)
    _run(theirs, p2, 50)
    for a, b in zip(p1, p2):
        assert torch.max(torch.abs(a - b)).item() <= 1e-12


def test_momentum_average_carries_across_batch_sizes():
    """Lecture rule with B changing: sgdlab.SGD follows the mu-form where the running average
    mu carries over and eta_eff = B eta', N_g = max(1, N'_g / B) change."""
    eta_p, n_gp, b0 = 1e-3, 256.0, 8
    batches = [8, 8, 32, 32, 32, 4, 64, 16]
    params = make_params(5)
    start = [p.detach().clone() for p in params]
    opt = sgdlab.SGD.from_conjugate(params, eta_prime=eta_p, n_g=n_gp, batch_size=b0)
    phis = [s.clone().requires_grad_() for s in start]
    mus = [torch.zeros_like(s) for s in start]
    for t in range(80):
        b = batches[(t // 10) % len(batches)]
        set_grads(params, t)
        opt.step(batch_size=b)
        set_grads(phis, t)
        n_g = max(1.0, n_gp / b)
        with torch.no_grad():
            for phi, mu in zip(phis, mus):
                mu.mul_(1 - 1 / n_g).add_(phi.grad, alpha=1 / n_g)
                phi.sub_(b * eta_p * mu)
    for p, phi in zip(params, phis):
        assert torch.max(torch.abs(p - phi)).item() <= 1e-12


def test_adam_debiasing_uses_the_product_of_betas():
    """Published Adam when the betas change: c_j = 1 - prod_tau beta_j(tau) (exact rule)."""
    params = make_params(6)
    lr, betas, eps = 0.01, (0.9, 0.99), 1e-8
    opt = sgdlab.Adam(params, lr=lr, betas=betas, eps=eps, ref_batch_size=4, scaling="exact")
    twin = [p.detach().clone().requires_grad_() for p in params]
    m = [torch.zeros_like(p) for p in twin]
    v = [torch.zeros_like(p) for p in twin]
    prod1 = prod2 = 1.0
    batches = [4, 16, 16, 8, 2]
    for t in range(60):
        b = batches[(t // 7) % len(batches)]
        set_grads(params, t)
        opt.step(batch_size=b)
        set_grads(twin, t)
        k = b / 4
        b1, b2 = betas[0] ** k, betas[1] ** k
        lr_t = lr * k
        prod1 *= b1
        prod2 *= b2
        with torch.no_grad():
            for x, mi, vi in zip(twin, m, v):
                mi.mul_(b1).add_(x.grad, alpha=1 - b1)
                vi.mul_(b2).addcmul_(x.grad, x.grad, value=1 - b2)
                x.sub_(lr_t * (mi / (1 - prod1)) / ((vi / (1 - prod2)).sqrt() + eps))
    for p, x in zip(params, twin):
        assert torch.max(torch.abs(p - x)).item() <= 1e-12


def test_step_batch_size_persists():
    params = make_params(7)
    opt = sgdlab.SGD(params, lr=0.1, ref_batch_size=10)
    set_grads(params, 0)
    opt.step(batch_size=40)
    assert opt.batch_size == 40
    assert opt.effective_hyperparameters(opt.param_groups[0])["lr"] == pytest.approx(0.4)
    opt.set_batch_size(5)
    assert opt.effective_hyperparameters(opt.param_groups[0])["lr"] == pytest.approx(0.05)


def test_lr_scheduler_scales_the_tuned_lr():
    """A torch LR scheduler acts on the lr at B0; the batch-size rule applies on top."""
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = sgdlab.SGD([p], lr=0.1, ref_batch_size=8, batch_size=32)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for t in range(6):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        expected_lr = 0.1 * 0.5 ** (t // 2) * 4
        assert torch.allclose(before - p.detach(), expected_lr * g, rtol=1e-14, atol=0)
        sched.step()


@pytest.mark.parametrize("cls,kwargs,form", ALL)
def test_zero_lr_is_a_no_op(cls, kwargs, form):
    params = make_params(8)
    start = [p.detach().clone() for p in params]
    kwargs = dict(kwargs, lr=0.0)
    opt = cls(params, weight_decay=0.1, ref_batch_size=4, **kwargs)
    _run(opt, params, 20, [4, 16, 2])
    for p, s in zip(params, start):
        assert torch.equal(p.detach(), s)


def test_adam_from_conjugate_is_linear_per_example():
    params = make_params(9)
    opt = sgdlab.Adam.from_conjugate(params, eta_prime=1e-4, n_g=10.0, n_s=1000.0, batch_size=64)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(64e-4)
    assert group["betas"] == pytest.approx((0.9, 0.999))
    assert group["second_moment"] == "per_example" and group["scaling"] == "linear"


@pytest.mark.parametrize(
    "path",
    [{"foreach": False}, {"foreach": True}, {"fused": True}],
    ids=["reference", "foreach", "fused"],
)
def test_centered_rmsprop_whose_alpha_scales_to_zero_is_refused(path):
    """The lecture rule moves the horizon to max(1, N'/B): alpha 0.9 tuned at 8 becomes 0 at
    128, where the centered variance of one gradient is zero (half the parameters became NaN,
    the rest jumped by 1e7). Refused before any parameter or state changes; the exact rule
    (alpha^16) steps. (The sqrt rule, which reached 0 the same way, no longer does.)"""
    params = make_params(0)
    groups = [{"params": params[:2]}, {"params": params[2:], "centered": True}]
    opt = sgdlab.RMSProp(groups, lr=0.01, alpha=0.9, ref_batch_size=8, scaling="lecture", **path)
    set_grads(params, 0)
    opt.step(batch_size=8)
    before = [p.detach().clone() for p in params]
    state = {
        (i, k): v.clone()
        for i, p in enumerate(params)
        for k, v in opt.state[p].items()
        if torch.is_tensor(v)
    }
    set_grads(params, 1)
    with pytest.raises(ValueError, match="effective alpha of 0"):
        opt.step(batch_size=128)
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    after = {
        (i, k): v
        for i, p in enumerate(params)
        for k, v in opt.state[p].items()
        if torch.is_tensor(v)
    }
    assert all(torch.equal(state[k], after[k]) for k in state)
    exact = sgdlab.RMSProp(
        [p.detach().clone().requires_grad_() for p in params],
        lr=0.01,
        alpha=0.9,
        centered=True,
        ref_batch_size=8,
        scaling="exact",
    )
    for q in exact.param_groups[0]["params"]:
        q.grad = torch.ones_like(q)
    exact.step(batch_size=128)
    assert all(torch.isfinite(q).all() for q in exact.param_groups[0]["params"])


@pytest.mark.parametrize("cls,kwargs,form", ALL)
def test_effective_hyperparameters_are_numbers_only(cls, kwargs, form):
    """What monitors read: the applied numbers, not the group with its parameter tensors."""
    opt = cls(make_params(0), ref_batch_size=8, batch_size=32, weight_decay=0.01, **kwargs)
    hp = opt.effective_hyperparameters(opt.param_groups[0])
    assert "params" not in hp and hp["batch_size"] == 32 and hp["weight_decay"] == 0.01
    for key, value in hp.items():
        values = value if isinstance(value, tuple) else (value,)
        assert all(type(v) in (int, float) for v in values), (key, value)
    zero = cls(make_params(0), ref_batch_size=8, batch_size=32, **dict(kwargs, lr=0.0))
    assert zero.effective_hyperparameters(zero.param_groups[0])["lr"] == 0.0
