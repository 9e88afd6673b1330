"""sgdlab's optimizers with default options are torch.optim's, to 1e-12 in float64.

300 steps, random shapes, three param groups with their own hyperparameters, gradients that
depend on the parameters (so any difference would grow), both the reference and the foreach
path; parameters and every state tensor are compared.
"""

from __future__ import annotations

import pytest
import torch

from .cases import TORCH_TWINS, checkpoint, make_params, param_groups, set_grads, state_tensors

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


@pytest.mark.parametrize("direction", ["torch->sgdlab", "sgdlab->torch"])
@pytest.mark.parametrize("name,cls,tcls,kwargs", TORCH_TWINS, ids=[c[0] for c in TORCH_TWINS])
def test_checkpoints_move_between_torch_and_sgdlab(name, cls, tcls, kwargs, direction):
    """A checkpoint taken mid-run by one continues identically in the other."""
    first, second = (tcls, cls) if direction == "torch->sgdlab" else (cls, tcls)
    p1, p2 = make_params(1), make_params(1)
    opt1 = first(param_groups(p1, cls), **kwargs)
    for t in range(20):
        set_grads(p1, t)
        opt1.step()
    with torch.no_grad():
        for a, b in zip(p2, p1):
            a.copy_(b)
    opt2 = second(param_groups(p2, cls), **kwargs)
    opt2.load_state_dict(checkpoint(opt1.state_dict()))
    for t in range(20, 60):
        set_grads(p1, t)
        set_grads(p2, t)
        opt1.step()
        opt2.step()
    for a, b in zip(p1, p2):
        assert torch.max(torch.abs(a - b)).item() <= 1e-12


MOMENTUM_TWINS = [
    ("sgd", "SGD", "SGD", {"lr": 0.1, "momentum": 0.9}),
    ("rmsprop", "RMSProp", "RMSprop", {"lr": 0.01, "momentum": 0.9}),
]


@pytest.mark.parametrize("path", ["reference", "fused"])
@pytest.mark.parametrize("how", ["OneCycleLR", "by hand"])
@pytest.mark.parametrize(
    "name,ours_name,theirs_name,kwargs", MOMENTUM_TWINS, ids=[c[0] for c in MOMENTUM_TWINS]
)
def test_momentum_changed_by_a_scheduler_matches_torch(
    name, ours_name, theirs_name, kwargs, how, path
):
    """A momentum that a scheduler cycles (OneCycleLR's default) or that is set by hand, down
    to 0 and back, keeps the buffer as torch does; only a change of batch size carries it
    over (the buffer was rescaled on every change: 0.64 off after 20 OneCycleLR steps)."""
    import sgdlab

    def run(cls, **extra):
        p = make_params(3)
        opt = cls(param_groups(p, getattr(sgdlab, ours_name)), **kwargs, **extra)
        sched = (
            torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
            if how == "OneCycleLR"
            else None
        )
        for t in range(20):
            set_grads(p, t)
            if sched is None:
                for group in opt.param_groups:
                    group["momentum"] = (0.5, 0.0, 0.9, 0.0, 0.7)[t % 5]
            opt.step()
            if sched is not None:
                sched.step()
        return p

    ours = run(getattr(sgdlab, ours_name), fused=path == "fused")
    theirs = run(getattr(torch.optim, theirs_name))
    for a, b in zip(ours, theirs, strict=True):
        assert torch.max(torch.abs(a - b)).item() <= 1e-12
