"""sgdlab's optimizers with default options are torch.optim's, to 1e-12 in float64.

300 steps, random shapes, three param groups with their own hyperparameters, gradients that
depend on the parameters (so any difference would grow), both the reference and the foreach
path; parameters and every state tensor are compared.
"""

from __future__ import annotations

import io

import pytest
import torch

from .cases import TORCH_TWINS, make_params, param_groups, set_grads, state_tensors

STEPS = 300


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "foreach"])
@pytest.mark.parametrize("name,cls,tcls,kwargs", TORCH_TWINS, ids=[c[0] for c in TORCH_TWINS])
def test_matches_torch(name, cls, tcls, kwargs, foreach):
    ours_p, theirs_p = make_params(0), make_params(0)
    ours = cls(param_groups(ours_p, cls), foreach=foreach, **kwargs)
    theirs = tcls(param_groups(theirs_p, cls), foreach=False, **kwargs)
    for t in range(STEPS):
        set_grads(ours_p, t)
        set_grads(theirs_p, t)
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p):
        assert torch.max(torch.abs(a - b)).item() <= 1e-12
    s_ours, s_theirs = state_tensors(ours), state_tensors(theirs)
    for key, value in s_theirs.items():
        assert key in s_ours, f"missing state {key}"
        assert torch.max(torch.abs(s_ours[key].double() - value.double())).item() <= 1e-12, key
    # The trajectory moved: the comparison is not between two untouched copies.
    assert max((a - make_params(0)[i]).abs().max().item() for i, a in enumerate(ours_p)) > 1e-3


@pytest.mark.parametrize("name,cls,tcls,kwargs", TORCH_TWINS, ids=[c[0] for c in TORCH_TWINS])
def test_default_arguments_match_torch(name, cls, tcls, kwargs):
    """Same defaults as the torch namesake, so a swap changes nothing."""
    ours = cls([torch.zeros(1, requires_grad=True)])
    theirs = tcls([torch.zeros(1, requires_grad=True)])
    for key, value in theirs.defaults.items():
        if key in ours.defaults:
            assert ours.defaults[key] == value, key


@pytest.mark.parametrize("name,cls,tcls,kwargs", TORCH_TWINS, ids=[c[0] for c in TORCH_TWINS])
def test_loads_torch_checkpoint(name, cls, tcls, kwargs):
    """A torch.optim checkpoint taken mid-run continues identically in sgdlab."""
    p_t, p_s = make_params(1), make_params(1)
    theirs = tcls(param_groups(p_t, cls), **kwargs)
    for t in range(20):
        set_grads(p_t, t)
        theirs.step()
    with torch.no_grad():
        for a, b in zip(p_s, p_t):
            a.copy_(b)
    ours = cls(param_groups(p_s, cls), **kwargs)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)  # a real checkpoint: no shared tensors
    buffer.seek(0)
    ours.load_state_dict(torch.load(buffer))
    for t in range(20, 60):
        set_grads(p_t, t)
        set_grads(p_s, t)
        theirs.step()
        ours.step()
    for a, b in zip(p_s, p_t):
        assert torch.max(torch.abs(a - b)).item() <= 1e-12


@pytest.mark.parametrize("name,cls,tcls,kwargs", TORCH_TWINS, ids=[c[0] for c in TORCH_TWINS])
def test_torch_loads_sgdlab_checkpoint(name, cls, tcls, kwargs):
    """And back: an sgdlab checkpoint continues identically in the torch.optim namesake."""
    p_s, p_t = make_params(2), make_params(2)
    ours = cls(param_groups(p_s, cls), **kwargs)
    for t in range(20):
        set_grads(p_s, t)
        ours.step()
    with torch.no_grad():
        for a, b in zip(p_t, p_s):
            a.copy_(b)
    theirs = tcls(param_groups(p_t, cls), **kwargs)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    theirs.load_state_dict(torch.load(buffer, weights_only=False))
    for t in range(20, 60):
        set_grads(p_t, t)
        set_grads(p_s, t)
        theirs.step()
        ours.step()
    for a, b in zip(p_s, p_t):
        assert torch.max(torch.abs(a - b)).item() <= 1e-12
