"""The fused path with mixed precision, GradScaler, gradients kept as flat-buffer views, the
fallbacks, and its arguments.

Mixed precision semantics under test: bfloat16/float16 parameters get float32 state and a
float32 master copy; the master follows the float32 reference run fed the same (upcast)
gradients, and the parameter is always the master rounded to its dtype.
"""

from __future__ import annotations

import pytest
import torch

import sgdlab
from sgdlab.optim import _fast

from .cases import checkpoint, set_grads, state_tensors

pytestmark = pytest.mark.usefixtures("eager_kernels")


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=g).to(dtype).requires_grad_() for s in [(6, 5), (7,), (3, 2, 2)]
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (sgdlab.Adam, dict(lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True)),
        (sgdlab.SGD, dict(lr=1e-2, momentum=0.9)),
        (sgdlab.RMSProp, dict(lr=1e-3, centered=True)),
    ],
    ids=["adamw", "sgd", "rmsprop"],
)
def test_low_precision_params_follow_a_float32_master(dtype, cls, kwargs):
    low = _params(dtype)
    ref = [p.detach().float().requires_grad_() for p in low]
    opt = cls(low, fused=True, **kwargs)
    opt_ref = cls(ref, foreach=False, **kwargs)
    for t in range(40):
        g = torch.Generator().manual_seed(t)
        for p, q in zip(low, ref):
            grad = torch.sin(q.detach() * 3) + 0.3 * torch.randn(q.shape, generator=g)
            p.grad = grad.to(dtype)
            q.grad = p.grad.float()
        opt.step()
        opt_ref.step()
    for p, q in zip(low, ref):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32 and p.dtype == dtype
        assert torch.max(torch.abs(master - q)).item() <= 1e-5
        assert torch.equal(p.detach(), master.to(dtype))
        for key, value in opt_ref.state[q].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert opt.state[p][key].dtype == torch.float32
                assert torch.max(torch.abs(opt.state[p][key] - value)).item() <= 1e-5, key
    # The master keeps updates below the parameter's resolution: far from the bf16 grid.
    m = opt.state[low[0]]["master_param"]
    assert not torch.equal(m, m.to(dtype).float())


@pytest.mark.parametrize("write", ["load_state_dict", "clamp_", "copy_ one of two"])
@pytest.mark.parametrize(
    "cls", [sgdlab.Adam, sgdlab.SGD, sgdlab.RMSProp], ids=["adam", "sgd", "rmsprop"]
)
def test_low_precision_params_written_in_place_keep_the_write(cls, write):
    """A bfloat16 parameter written in place between steps (a loaded checkpoint, weight
    clipping) gets its float32 master from the write; the other parameters keep theirs.
    Before, the next step wrote the old master back (weights restored after a load)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    opt = cls(model.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(0)

    def step():
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
        opt.step()

    for _ in range(3):
        step()
    params = list(model.parameters())
    kept = [opt.state[p]["master_param"].clone() for p in params]
    with torch.no_grad():
        if write == "load_state_dict":
            model.load_state_dict(
                {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
            )
        elif write == "clamp_":
            for p in params:
                p.clamp_(-0.01, 0.01)
        else:
            params[0].copy_(torch.full_like(params[0], 0.25))
    written = [p.detach().float().clone() for p in params]
    ref = [w.clone().requires_grad_() for w in written]
    opt_ref = cls(ref, lr=1e-3, foreach=False)
    for q, p in zip(ref, params, strict=True):  # the reference continues from the writes
        opt_ref.state[q] = {
            k: v.float().clone() if torch.is_tensor(v) else v
            for k, v in opt.state[p].items()
            if k != "master_param"
        }
    step()
    for q, p in zip(ref, params, strict=True):
        q.grad = p.grad.float()
    opt_ref.step()
    changed = range(len(params)) if write != "copy_ one of two" else [0]
    for i, (p, q) in enumerate(zip(params, ref, strict=True)):
        master = opt.state[p]["master_param"]
        if i in changed:
            assert torch.allclose(master, q.detach(), rtol=0, atol=1e-6), i
        else:  # untouched: stepped from its own master, not from the rounded parameter
            assert not torch.equal(kept[i], master)
            assert (master - kept[i]).abs().max() < 1e-2
        assert torch.equal(p.detach(), master.to(torch.bfloat16))


def test_grad_scaler_skips_inf_steps_and_unscales_exactly():
    """``torch.amp.GradScaler("cpu")``: a finite step equals the unscaled float32 step (the
    scale is a power of two); a step with an inf leaves parameters and state untouched and
    halves the scale."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    twin = torch.nn.Linear(5, 3)
    twin.load_state_dict(model.state_dict())
    opt = sgdlab.Adam(model.parameters(), lr=0.01, fused=True)
    ref = sgdlab.Adam(twin.parameters(), lr=0.01, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    g = torch.Generator().manual_seed(1)
    for t in range(8):
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad()
        scaler.scale((model(x) - y).pow(2).mean()).backward()
        poisoned = t in (3, 6)
        if poisoned:
            model.weight.grad[1, 2] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            state_before = {
                k: v.clone() if isinstance(v, torch.Tensor) else v
                for k, v in state_tensors(opt).items()
            }
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if poisoned:
            assert scaler.get_scale() == scale / 2
            for p, b in zip(model.parameters(), before):
                assert torch.equal(p.detach(), b)
            for k, v in state_tensors(opt).items():
                same = (
                    torch.equal(v, state_before[k])
                    if isinstance(v, torch.Tensor)
                    else (v == state_before[k])
                )
                assert same, k
            continue
        ref.zero_grad()
        (twin(x) - y).pow(2).mean().backward()
        ref.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.max(torch.abs(p - q)).item() <= 1e-6
    assert opt.skipped_steps == 0  # GradScaler skipped: the optimizer never saw the inf


def test_gradients_stay_views_of_the_flat_buffer():
    """After a step, ``p.grad`` is a view of the flat gradient buffer; with
    ``zero_grad(set_to_none=False)`` the backward accumulates into it and no copy is needed;
    the trajectory equals the reference's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    model = model.double()
    twin = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    twin = twin.double()
    twin.load_state_dict(model.state_dict())
    opt = sgdlab.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    ref = sgdlab.SGD(twin.parameters(), lr=0.1, momentum=0.9, foreach=False)
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        for net, o in ((model, opt), (twin, ref)):
            o.zero_grad(set_to_none=False)
            net(x).pow(2).mean().backward()
            o.step()
        (fg,) = next(iter(opt._fused.entries.values())).fgs
        ptr = fg.flat_grad.untyped_storage().data_ptr()
        assert all(p.grad.untyped_storage().data_ptr() == ptr for p in model.parameters())
        assert all(p.grad is v for p, v in zip(model.parameters(), fg.grad_views))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.max(torch.abs(p - q)).item() <= 1e-12


def test_non_contiguous_parameter_falls_back_to_foreach():
    base = torch.randn(4, 3, dtype=torch.float64)
    ps = [
        base.t().requires_grad_(),  # a transposed (non-contiguous) leaf
        torch.randn(5, dtype=torch.float64, requires_grad=True),
    ]
    assert not ps[0].is_contiguous()
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = sgdlab.Adam(ps, lr=0.05, fused=True)
    ref = sgdlab.Adam(qs, lr=0.05, foreach=False)
    for t in range(5):
        set_grads(ps, t)
        set_grads(qs, t)
        opt.step()
        ref.step()
    assert not opt._fused
    for p, q in zip(ps, qs):
        assert torch.max(torch.abs(p - q)).item() <= 1e-12


def test_param_group_added_later_and_lr_changes():
    ps = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = sgdlab.RMSProp(ps[:2], lr=0.01, momentum=0.5, fused=True)
    ref = sgdlab.RMSProp(qs[:2], lr=0.01, momentum=0.5, foreach=False)
    for t in range(12):
        if t == 4:
            opt.add_param_group({"params": [ps[2]], "lr": 0.03})
            ref.add_param_group({"params": [qs[2]], "lr": 0.03})
        if t == 8:
            for o in (opt, ref):
                o.param_groups[0]["lr"] = 0.002
        set_grads(ps, t)
        set_grads(qs, t)
        opt.step()
        ref.step()
    for p, q in zip(ps, qs):
        assert torch.max(torch.abs(p - q)).item() <= 1e-12
    assert len(opt._fused.entries) == 2


def test_bad_fused_arguments():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"fused=True and foreach=True cannot both be set"):
        sgdlab.Adam(p, fused=True, foreach=True)
    with pytest.raises(ValueError, match=r"fused must be None, True or False, got 'yes'"):
        sgdlab.SGD(p, fused="yes")


def test_low_precision_resume_is_bit_identical():
    """float32 state and master survive ``state_dict``/``load_state_dict`` (which would cast
    them to the parameters' bfloat16)."""

    def run(opt, params, start, stop):
        for t in range(start, stop):
            g = torch.Generator().manual_seed(t)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()

    params = _params(torch.bfloat16, seed=3)
    opt = sgdlab.Adam(params, lr=1e-3, fused=True)
    run(opt, params, 0, 10)
    saved = checkpoint({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()})
    run(opt, params, 10, 20)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = sgdlab.Adam(resumed, lr=1e-3, fused=True)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[0]]["exp_avg"].dtype == torch.float32
    run(opt2, resumed, 10, 20)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            assert torch.equal(opt.state[a][key], opt2.state[b][key]), key


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_nonfinite_policies_with_flat_buffers(nonfinite):
    """Once the flat buffers exist the finite check is one reduction over the flat gradient
    buffer; a NaN is still caught before any change and named, and skipped steps change
    nothing."""
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(3, 4), (5,)]]
    opt = sgdlab.Adam(
        [{"params": params[:1]}, {"params": params[1:]}], lr=0.1, fused=True, nonfinite=nonfinite
    )
    for t in range(3):
        set_grads(params, t)
        opt.step()
    assert _fast.grads_all_finite(opt)
    set_grads(params, 3)
    params[1].grad[2] = float("nan")
    assert not _fast.grads_all_finite(opt)
    before = [p.detach().clone() for p in params]
    state_before = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state_tensors(opt).items()
    }
    if nonfinite == "raise":
        with pytest.raises(
            sgdlab.optim.NonFiniteGradientError,
            match=r"param group 1, parameter 0 \(shape \(5,\)\): grad",
        ):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    for k, v in state_tensors(opt).items():
        assert (
            torch.equal(v, state_before[k])
            if isinstance(v, torch.Tensor)
            else (v == state_before[k])
        )


def test_gradient_views_of_other_buffers_are_left_in_place():
    """A gradient that is a view of someone else's buffer (DDP's bucket views) is copied from,
    never replaced; a plain gradient is replaced by the flat buffer's view."""
    bucket = torch.zeros(12, dtype=torch.float64)
    ps = [
        torch.randn(3, 2, dtype=torch.float64, requires_grad=True),
        torch.randn(6, dtype=torch.float64, requires_grad=True),
    ]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = sgdlab.SGD(ps, lr=0.1, momentum=0.5, fused=True)
    ref = sgdlab.SGD(qs, lr=0.1, momentum=0.5, foreach=False)
    for t in range(4):
        bucket.copy_(torch.linspace(-1, 1, 12, dtype=torch.float64) * (t + 1))
        ps[0].grad = bucket[:6].view(3, 2)
        ps[1].grad = bucket[6:].clone()
        qs[0].grad, qs[1].grad = bucket[:6].view(3, 2).clone(), bucket[6:].clone()
        opt.step()
        ref.step()
        assert ps[0].grad._base is bucket
        assert ps[1].grad._base is not None and ps[1].grad._base is not bucket
    for p, q in zip(ps, qs):
        assert torch.max(torch.abs(p - q)).item() <= 1e-12


def test_adam_parameters_with_different_step_counts_take_the_foreach_path():
    """After a parameter missed a step its bias corrections differ from its group's: that
    group takes the foreach path on the same storage (no rebuild of flat buffers per step),
    other groups stay fused, and everything equals the reference."""
    ps = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(4, 3), (5,), (6,)]]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = sgdlab.Adam([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.05, fused=True)
    ref = sgdlab.Adam([{"params": qs[:2]}, {"params": qs[2:]}], lr=0.05, foreach=False)
    ptrs = []
    for t in range(10):
        set_grads(ps, t)
        set_grads(qs, t)
        if t == 3:
            ps[1].grad = None
            qs[1].grad = None
        opt.step()
        ref.step()
        ptrs.append(ps[0].data_ptr())
    assert len(set(ptrs[4:])) == 1  # no rebuild after the desynchronisation
    assert id(opt.param_groups[0]) not in opt._fused.entries
    assert id(opt.param_groups[1]) in opt._fused.entries
    for p, q in zip(ps, qs):
        assert torch.max(torch.abs(p - q)).item() <= 1e-12


def test_finite_screen_is_exact_and_overflow_only_costs_the_per_tensor_check():
    """The flat-buffer screen is a sum: +inf and -inf together (sum NaN) are caught; finite
    gradients whose float32 sum overflows fail the screen but pass the exact per-tensor check,
    so the step happens."""
    params = [torch.zeros(4, requires_grad=True), torch.zeros(3, requires_grad=True)]
    opt = sgdlab.SGD(params, lr=0.1, momentum=0.9, fused=True)  # (Adam would square to inf)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    params[0].grad = torch.tensor([float("inf"), 1.0, 1.0, 1.0])
    params[1].grad = torch.tensor([float("-inf"), 1.0, 1.0])
    assert not _fast.grads_all_finite(opt)
    with pytest.raises(sgdlab.optim.NonFiniteGradientError, match="parameter 0"):
        opt.step()
    big = torch.finfo(torch.float32).max / 2
    params[0].grad = torch.full((4,), big)
    params[1].grad = torch.full((3,), big)
    assert not _fast.grads_all_finite(opt)  # the sum overflows ...
    before = [p.detach().clone() for p in params]
    opt.step()  # ... the per-tensor check finds every gradient finite: the step happens
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.isfinite(p).all() for p in params)
