"""Inputs torch.optim accepts are accepted on every path with torch's numbers (float64 twins);
inputs it refuses are refused before anything changes.

Hyperparameters as 1-element tensors (0, 1 or 2 dimensions) and numpy scalars; parameters of
size zero, on the meta device, or of an integer dtype; param groups that cannot all be stepped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sgdlab

from .cases import make_params, set_grads

PATHS = [dict(foreach=False), dict(foreach=True), dict(fused=True)]
PATH_IDS = ["reference", "foreach", "fused"]
TWINS = [
    (sgdlab.SGD, torch.optim.SGD),
    (sgdlab.RMSProp, torch.optim.RMSprop),
    (sgdlab.Adam, torch.optim.Adam),
]
TWIN_IDS = ["sgd", "rmsprop", "adam"]


def _run(opt, params, steps=12):
    for t in range(steps):
        set_grads(params, t)
        opt.step()


def _assert_same(ours, theirs):
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b) or (a - b).abs().max().item() <= 1e-14


# Adam with foreach=True refuses a tensor lr, as torch.optim.Adam does (tested below).
LR_CASES = [
    (cls, tcls, path)
    for cls, tcls in TWINS
    for path in PATHS
    if not (cls is sgdlab.Adam and path.get("foreach"))
]


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1d", "2d"])
@pytest.mark.parametrize(
    "cls,tcls,path",
    LR_CASES,
    ids=[f"{c.__name__}-{PATH_IDS[PATHS.index(p)]}" for c, _, p in LR_CASES],
)
def test_tensor_lr_matches_torch(cls, tcls, path, shape):
    """A 1-element lr tensor of any number of dimensions steps as torch's does (its default
    path), and a scheduler that fills it in place is followed; a 1- or 2-dim one crashed
    every default path (``add_(): argument 'alpha' must be Number``)."""
    ours_p, theirs_p = make_params(0), make_params(0)
    kwargs = dict(momentum=0.5) if cls is not sgdlab.Adam else dict(betas=(0.8, 0.99))
    ours = cls(ours_p, lr=torch.full(shape, 0.01, dtype=torch.float64), **path, **kwargs)
    theirs = tcls(
        theirs_p, lr=torch.full(shape, 0.01, dtype=torch.float64), foreach=False, **kwargs
    )
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5) for o in (ours, theirs)]
    for t in range(12):
        for params, opt, sched in zip((ours_p, theirs_p), (ours, theirs), scheds):
            set_grads(params, t)
            opt.step()
            sched.step()
    assert isinstance(ours.param_groups[0]["lr"], torch.Tensor)
    assert ours.param_groups[0]["lr"].item() == theirs.param_groups[0]["lr"].item() == 0.00125
    _assert_same(ours_p, theirs_p)


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize(
    "path", [dict(foreach=False), dict(fused=True)], ids=["reference", "fused"]
)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1d", "2d"])
def test_tensor_betas_match_torch(shape, path):
    """Adam's betas as a pair of 1-element tensors (refused before) step as torch's."""
    ours_p, theirs_p = make_params(0), make_params(0)

    def betas():
        return (
            torch.full(shape, 0.8, dtype=torch.float64),
            torch.full(shape, 0.99, dtype=torch.float64),
        )

    ours = sgdlab.Adam(ours_p, lr=0.01, betas=betas(), **path)
    theirs = torch.optim.Adam(theirs_p, lr=0.01, betas=betas(), foreach=False)
    _run(ours, ours_p)
    _run(theirs, theirs_p)
    _assert_same(ours_p, theirs_p)


NUMPY = [
    (
        sgdlab.SGD,
        torch.optim.SGD,
        dict(
            lr=np.float32(0.01),
            momentum=np.float32(0.9),
            dampening=np.float64(0.1),
            weight_decay=np.float32(0.01),
        ),
    ),
    (
        sgdlab.SGD,
        torch.optim.SGD,
        dict(lr=0.01, momentum=torch.tensor(0.9), weight_decay=torch.tensor(0.01)),
    ),
    (
        sgdlab.RMSProp,
        torch.optim.RMSprop,
        dict(
            lr=np.float64(0.01),
            alpha=np.float32(0.9),
            eps=np.float32(1e-6),
            momentum=np.float32(0.5),
            weight_decay=np.float64(0.01),
        ),
    ),
    (
        sgdlab.Adam,
        torch.optim.Adam,
        dict(lr=0.01, eps=np.float32(1e-6), weight_decay=np.float32(0.01)),
    ),
    (sgdlab.Adam, torch.optim.Adam, dict(lr=0.01, eps=torch.tensor(1e-6))),
]


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize(
    "cls,tcls,kwargs", NUMPY, ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(NUMPY)]
)
def test_numpy_and_tensor_scalars_match_torch(cls, tcls, kwargs, path):
    """numpy scalars (``momentum=np.float32(0.9)``, refused before) and tensor scalars torch
    accepts step as torch's with the same values."""
    ours_p, theirs_p = make_params(0), make_params(0)
    ours = cls(ours_p, **path, **kwargs)
    theirs = tcls(theirs_p, foreach=False, **kwargs)
    _run(ours, ours_p)
    _run(theirs, theirs_p)
    _assert_same(ours_p, theirs_p)


@pytest.mark.parametrize("key", ["lr", "betas"])
def test_adam_tensor_lr_with_foreach_is_refused_at_construction(key):
    """torch.optim.Adam refuses a tensor lr or betas with foreach=True (and capturable=False);
    sgdlab took it and failed in ``_foreach_addcdiv_`` after advancing the step count and the
    moments."""
    value = dict(lr=torch.tensor(1e-3), betas=(torch.tensor(0.9), torch.tensor(0.99)))[key]
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError):
        torch.optim.Adam([p], foreach=True, **{key: value})
    with pytest.raises(ValueError, match=rf"{key} as a tensor is not supported with foreach"):
        sgdlab.Adam([p], foreach=True, **{key: value})
    opt = sgdlab.Adam([p])
    with pytest.raises(ValueError, match=rf"{key} as a tensor is not supported with foreach"):
        opt.add_param_group(
            {"params": [torch.nn.Parameter(torch.ones(2))], "foreach": True, key: value}
        )


REFUSED = [
    (
        sgdlab.SGD,
        dict(lr=torch.tensor([0.1, 0.2])),
        r"lr given as a tensor must be a 1-element real tensor, got shape \(2,\)",
    ),
    (
        sgdlab.Adam,
        dict(betas=(0.9, torch.tensor(0.99))),
        r"betas must be both numbers or both tensors",
    ),
    (
        sgdlab.Adam,
        dict(betas=(torch.tensor(0.9), torch.tensor(1.0))),
        r"betas\[1\] must satisfy 0 <= beta < 1",
    ),
    (sgdlab.RMSProp, dict(alpha=np.float32(1.5)), r"alpha must satisfy 0 <= alpha < 1"),
    (sgdlab.SGD, dict(momentum=torch.tensor(-0.1)), r"momentum must be finite and >= 0"),
    (sgdlab.SGD, dict(lr=torch.tensor(True)), r"lr given as a tensor must be a 1-element real"),
]


@pytest.mark.parametrize("cls,kwargs,pattern", REFUSED)
def test_bad_tensor_and_numpy_hyperparameters_are_refused(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls([torch.nn.Parameter(torch.ones(2))], **kwargs)


def _with_empty(seed):
    return [torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)] + make_params(seed)


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("cls,tcls", TWINS, ids=TWIN_IDS)
def test_zero_size_parameter_steps_as_torch(cls, tcls, path):
    """A parameter with no elements (an empty embedding, a pruned layer) next to others: the
    default non-finite check crashed in ``_foreach_norm`` (no identity for an empty max)."""
    ours_p, theirs_p = _with_empty(0), _with_empty(0)
    ours = cls(ours_p, lr=0.01, **path)
    theirs = tcls(theirs_p, lr=0.01, foreach=False)
    _run(ours, ours_p)
    _run(theirs, theirs_p)
    _assert_same(ours_p, theirs_p)
    assert ours.state[ours_p[0]].keys() >= theirs.state[theirs_p[0]].keys()
    # the check still sees the other parameters
    set_grads(ours_p, 0)
    ours_p[2].grad[0] = float("nan")
    with pytest.raises(sgdlab.NonFiniteGradientError, match="param group 0, parameter 2"):
        ours.step()


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("cls,tcls", TWINS, ids=TWIN_IDS)
def test_meta_parameters_step_as_torch(cls, tcls, path):
    """Meta parameters (shape dry-runs) step as in torch.optim, leaving the same state entries
    of the same shapes on the meta device; they failed with ``Tensor.item() cannot be called on
    meta tensors``."""
    kwargs = dict(momentum=0.9) if cls is not sgdlab.Adam else dict(amsgrad=True)
    states = []
    for make, extra in ((cls, path), (tcls, {})):
        params = [torch.zeros(s, device="meta", requires_grad=True) for s in [(4, 3), (5,)]]
        opt = make(params, lr=0.1, **kwargs, **extra)
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
        assert all(p.is_meta for p in params)
        states.append(
            [
                {
                    k: (v.shape, v.device.type)
                    for k, v in opt.state[p].items()
                    if isinstance(v, torch.Tensor)
                }
                for p in params
            ]
        )
    assert states[0] == states[1]
    assert states[0][0]  # state was created


@pytest.mark.parametrize(
    "cls", [sgdlab.SGD, sgdlab.RMSProp, sgdlab.Adam], ids=["sgd", "rmsprop", "adam"]
)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_parameters_are_refused_naming_them(cls, dtype):
    """An int64 (or bool) parameter was accepted and failed at the first step naming no
    parameter (torch.optim fails there too); it is refused at construction and by
    add_param_group, which leaves the optimizer's groups as they were."""
    good = torch.ones(2, requires_grad=True)
    bad = torch.zeros(3, dtype=dtype)
    with pytest.raises(
        ValueError,
        match=rf"param group 0, parameter 1 \(shape \(3,\)\) has "
        rf"dtype {dtype}",
    ):
        cls([good, bad])
    opt = cls([good])
    with pytest.raises(ValueError, match=rf"param group 1, parameter 0 .* dtype {dtype}"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [torch.ones(3, requires_grad=True)]})  # still usable


def test_a_refused_param_group_is_not_left_behind():
    """add_param_group with a bad hyperparameter raised but kept the bad group, which the
    next step then used."""
    opt = sgdlab.Adam([torch.ones(2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"betas\[0\] must satisfy"):
        opt.add_param_group({"params": [torch.ones(1, requires_grad=True)], "betas": (-0.1, 0.9)})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("cls", [sgdlab.RMSProp, sgdlab.Adam], ids=["rmsprop", "adam"])
def test_sparse_group_is_refused_before_any_group_steps(cls, path):
    """A dense param group followed by one with a sparse gradient: the error came after the
    dense group had been stepped. Parameters and state stay untouched now."""
    dense = make_params(0)[:2]
    emb = torch.nn.Embedding(6, 3, sparse=True).double()
    opt = cls([{"params": dense}, {"params": list(emb.parameters())}], lr=0.1, **path)
    set_grads(dense, 0)
    emb(torch.tensor([1, 4])).sum().backward()
    before = [p.detach().clone() for p in dense] + [emb.weight.detach().clone()]
    with pytest.raises(
        ValueError,
        match=r"does not support sparse gradients; param group 1, "
        r"parameter 0 \(shape \(6, 3\)\)",
    ):
        opt.step()
    for p, b in zip(dense + [emb.weight], before):
        assert torch.equal(p.detach(), b)
    assert len(opt.state) == 0
