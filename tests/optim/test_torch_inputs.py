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


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1d", "2d"])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("cls,tcls", TWINS, ids=TWIN_IDS)
def test_tensor_lr_matches_torch(cls, tcls, path, shape):
    """A 1-element lr tensor of any number of dimensions steps as torch's does (its default
    path), and a scheduler that fills it in place is followed; a 1- or 2-dim one crashed
    every default path (``add_(): argument 'alpha' must be Number``)."""
    if cls is sgdlab.Adam and path.get("foreach"):
        pytest.skip("refused, as torch.optim.Adam does (test_adam_tensor_lr_with_foreach...)")
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
