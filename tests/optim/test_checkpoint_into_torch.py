"""An sgdlab checkpoint loaded into its torch.optim namesake: sgdlab's own keys in the param
groups (batch_size, ref_batch_size, scaling, second_moment, power, ...) change nothing in
torch, which continues exactly as sgdlab does (at B == B0, where the two take the same
steps)."""

from __future__ import annotations

import copy

import pytest
import torch

import sgdlab

CASES = [
    (sgdlab.SGD, torch.optim.SGD, dict(momentum=0.9, fused=True)),
    (sgdlab.SGD, torch.optim.SGD, dict(momentum=0.9, nesterov=True, ref_batch_size=16)),
    (sgdlab.RMSProp, torch.optim.RMSprop, dict(momentum=0.5, centered=True, fused=True)),
    (sgdlab.RMSProp, torch.optim.RMSprop, dict(alpha=0.9, scaling="exact", batch_size=8)),
    (sgdlab.Adam, torch.optim.Adam, dict(amsgrad=True, fused=True)),
    (sgdlab.Adam, torch.optim.Adam, dict(weight_decay=0.1, decoupled_weight_decay=True)),
    (sgdlab.Adam, torch.optim.Adam, dict(ref_batch_size=32, scaling="lecture", foreach=True)),
]


@pytest.mark.parametrize("ours_cls,theirs_cls,kwargs", CASES)
def test_torch_continues_an_sgdlab_checkpoint_exactly(ours_cls, theirs_cls, kwargs):
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64))
    ours = ours_cls([p], lr=0.01, **kwargs)
    for _ in range(4):
        p.grad = torch.randn(5, 3, generator=g, dtype=torch.float64)
        ours.step()
    q = torch.nn.Parameter(p.detach().clone())
    theirs = theirs_cls([q], lr=0.5)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    for _ in range(4):
        grad = torch.randn(5, 3, generator=g, dtype=torch.float64)
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)  # float64 twins
