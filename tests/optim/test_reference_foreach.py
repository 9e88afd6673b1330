"""The foreach fast path equals the per-tensor reference path in float64, parameters and
state, for every option set (torch's and the lecture's), including batch-size changes."""

from __future__ import annotations

import pytest
import torch

from .cases import (
    ALL_CASES,
    make_params,
    param_groups,
    set_grads,
    state_tensors,
)

CASES = ALL_CASES
BATCHES = [8, 8, 16, 16, 4, 32, 32, 8]


@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_foreach_equals_reference(name, cls, kwargs):
    per_example = kwargs.get("second_moment") == "per_example"
    ref_p, fe_p = make_params(2), make_params(2)
    ref = cls(param_groups(ref_p, cls), foreach=False, **kwargs)
    fe = cls(param_groups(fe_p, cls), foreach=True, **kwargs)
    for t in range(120):
        b = BATCHES[(t // 15) % len(BATCHES)] if "ref_batch_size" in kwargs else None
        set_grads(ref_p, t, per_example)
        set_grads(fe_p, t, per_example)
        if t % 17 == 5:  # a parameter without gradient this step is skipped by both
            ref_p[1].grad = None
            fe_p[1].grad = None
        ref.step(batch_size=b)
        fe.step(batch_size=b)
    for a, c in zip(ref_p, fe_p):
        assert torch.max(torch.abs(a - c)).item() <= 1e-12
    s_ref, s_fe = state_tensors(ref), state_tensors(fe)
    assert s_ref.keys() == s_fe.keys()
    for key, value in s_ref.items():
        if isinstance(value, torch.Tensor):
            assert torch.max(torch.abs(value - s_fe[key])).item() <= 1e-12, key
        else:
            assert value == pytest.approx(s_fe[key], abs=1e-15), key


def test_foreach_handles_mixed_dtypes():
    """Tensors of different dtypes go to separate foreach calls, each matching the reference."""
    import sgdlab

    ps = [
        torch.randn(4, dtype=torch.float64, requires_grad=True),
        torch.randn(3, dtype=torch.float32, requires_grad=True),
    ]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    a = sgdlab.Adam(ps, lr=0.1, foreach=True)
    b = sgdlab.Adam(qs, lr=0.1, foreach=False)
    for t in range(10):
        for p, q in zip(ps, qs):
            g = torch.cos(p.detach() * (t + 1))
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q) or torch.max(torch.abs(p - q)).item() <= 1e-6
        assert p.dtype == q.dtype
