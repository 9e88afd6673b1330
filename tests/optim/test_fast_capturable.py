"""``capturable=True``: Adam's and RMSProp's step with its counters on the device.

Oracles: the per-tensor reference path in float64 (parameters and every state entry, through
batch-size changes that move the betas, parameters that miss a step, a checkpoint taken
mid-run); a checkpoint written by a capturable optimizer continues identically in a plain one;
and the device scalars are built once and reused while the hyperparameters stay the same (the
property that lets the step be captured: nothing is sent from the host). Graph capture itself
needs CUDA: tests/optim/test_fast_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

import sgdlab

from .cases import ALL_CASES, checkpoint, make_params, param_groups, set_grads

CASES = [case for case in ALL_CASES if case[1] is not sgdlab.SGD]
BATCHES = [8, 8, 16, 16, 4, 32, 32, 8]


pytestmark = pytest.mark.usefixtures("eager_kernels")


def _state(opt) -> dict:
    state = opt.state_dict()["state"]  # state_dict brings device counters to the state
    return {(i, k): v for i, st in state.items() for k, v in st.items()}


def _assert_same(ref, cap, ref_p, cap_p, tol=1e-12):
    for a, c in zip(ref_p, cap_p):
        assert torch.max(torch.abs(a - c)).item() <= tol
    s_ref, s_cap = _state(ref), _state(cap)
    assert s_ref.keys() == s_cap.keys()
    for key, value in s_ref.items():
        if isinstance(value, torch.Tensor):
            assert torch.max(torch.abs(value - s_cap[key])).item() <= tol, key
        else:
            assert value == pytest.approx(s_cap[key], rel=1e-13, abs=1e-15), key


@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_capturable_equals_reference(name, cls, kwargs):
    per_example = kwargs.get("second_moment") == "per_example"
    ref_p, cap_p = make_params(2), make_params(2)
    ref = cls(param_groups(ref_p, cls), foreach=False, **kwargs)
    cap = cls(param_groups(cap_p, cls), capturable=True, **kwargs)
    assert cap.nonfinite == "ignore"
    for t in range(60):
        b = BATCHES[(t // 8) % len(BATCHES)] if "ref_batch_size" in kwargs else None
        set_grads(ref_p, t, per_example)
        set_grads(cap_p, t, per_example)
        if t == 17:  # a parameter without gradient: skipped by both (cap leaves the kernel)
            ref_p[1].grad = cap_p[1].grad = None
        ref.step(batch_size=b)
        cap.step(batch_size=b)
        if t == 30:  # a resume mid-run: the device counters travel through the state dict
            cap.load_state_dict(checkpoint(cap.state_dict()))
    _assert_same(ref, cap, ref_p, cap_p)
    # the device-side kernels did the work (not a fallback to the per-tensor path); Adam's
    # first group, whose parameters' step counts differ after the missed step, is the
    # documented exception (per-parameter bias corrections: the foreach path)
    fgs = [fg for entry in cap._fused.entries.values() for fg in entry.fgs]
    assert len(fgs) >= 2 and all("sc" in fg.device_cache for fg in fgs)


@pytest.mark.parametrize("correction", ["published", "lecture", "none"])
def test_capturable_checkpoint_continues_in_a_plain_optimizer(correction):
    a, b = make_params(3), make_params(3)
    cap = sgdlab.Adam(a, lr=0.01, betas=(0.8, 0.95), bias_correction=correction, capturable=True)
    plain = sgdlab.Adam(b, lr=0.01, betas=(0.8, 0.95), bias_correction=correction, foreach=False)
    for t in range(7):
        set_grads(a, t)
        set_grads(b, t)
        cap.step()
        plain.step()
    moved = [p.detach().clone().requires_grad_() for p in a]
    resumed = sgdlab.Adam(
        moved, lr=0.01, betas=(0.8, 0.95), bias_correction=correction, foreach=False
    )
    resumed.load_state_dict(checkpoint(cap.state_dict()))
    for t in range(7, 15):
        set_grads(moved, t)
        set_grads(b, t)
        resumed.step()
        plain.step()
    for p, q in zip(moved, b):
        assert torch.max(torch.abs(p - q)).item() <= 1e-12


def test_device_scalars_are_reused_until_a_hyperparameter_changes():
    ps = make_params(4)
    opt = sgdlab.Adam(ps, lr=0.01, capturable=True, ref_batch_size=8)
    set_grads(ps, 0)
    opt.step()
    (fg,) = next(iter(opt._fused.entries.values())).fgs

    def held():
        return fg.device_cache["sc"][1], fg.device_cache["hp64"][1], fg.host.counters

    sc, hp64, counters = held()
    steps = fg.steps
    for t in range(1, 4):
        set_grads(ps, t)
        opt.step()
    assert all(a is b for a, b in zip(held(), (sc, hp64, counters))) and fg.steps is steps
    assert opt.state[ps[0]]["step"].item() == 4  # advanced by the kernel, a view of fg.steps
    opt.step(batch_size=32)  # the lr and betas move: new device scalars on this eager step
    assert held()[1] is not hp64 and held()[2] is counters


def test_capturable_validation():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="nonfinite must be 'ignore' with capturable=True"):
        sgdlab.Adam(p, capturable=True, nonfinite="raise")
    with pytest.raises(ValueError, match="capturable=True runs on the fused path"):
        sgdlab.RMSProp(p, capturable=True, fused=False)
    with pytest.raises(ValueError, match="capturable=True runs on the fused path"):
        sgdlab.Adam(p, capturable=True, foreach=True)
    with pytest.raises(ValueError, match="capturable must be True or False"):
        sgdlab.Adam(p, capturable="yes")
    assert sgdlab.Adam(p).nonfinite == "raise"


@pytest.mark.parametrize("correction", ["published", "lecture"])
def test_add_param_group_keeps_the_device_counters(correction):
    """A capturable Adam keeps its debiasing products (or lecture counts) on the device; adding
    a param group rebuilds the flat buffers, which restarted them from beta^t with the current
    betas (7e-3 and 2.5e-2 off the reference path once the betas had moved with the batch
    size). Oracle: the reference path, same gradients."""

    def run(**path):
        p = torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        q = torch.randn(3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        p.requires_grad_()
        q.requires_grad_()
        opt = sgdlab.Adam(
            [p],
            lr=1e-2,
            betas=(0.9, 0.99),
            bias_correction=correction,
            ref_batch_size=8,
            scaling="exact",
            **path,
        )
        g = torch.Generator().manual_seed(2)
        for k in range(12):
            p.grad = torch.randn(5, generator=g, dtype=torch.float64)
            if k >= 6:
                q.grad = torch.randn(3, generator=g, dtype=torch.float64)
            opt.step(batch_size=(8, 64, 2, 32)[k % 4])
            if k == 5:
                opt.add_param_group({"params": [q]})
        return p.detach(), q.detach()

    ref = run(foreach=False)
    got = run(capturable=True)
    for a, b in zip(got, ref, strict=True):
        assert torch.max(torch.abs(a - b)).item() <= 1e-12
