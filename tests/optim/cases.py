"""The table of optimizers under test: sgdlab class, torch twin, and option sets.

Each case is (name, sgdlab class, torch class or None, kwargs for both, extra sgdlab-only
kwargs). Cases with a torch twin are torch's own options; the others are the lecture's
variants, checked against the reference path and closed forms.
"""

from __future__ import annotations

import io

import torch

import sgdlab

TORCH_TWINS = [
    ("sgd-plain", sgdlab.SGD, torch.optim.SGD, dict(lr=0.05)),
    ("sgd-momentum", sgdlab.SGD, torch.optim.SGD, dict(lr=0.03, momentum=0.9)),
    (
        "sgd-nesterov-wd",
        sgdlab.SGD,
        torch.optim.SGD,
        dict(lr=0.02, momentum=0.8, nesterov=True, weight_decay=0.01),
    ),
    (
        "sgd-dampening-max",
        sgdlab.SGD,
        torch.optim.SGD,
        dict(lr=0.02, momentum=0.7, dampening=0.3, maximize=True, weight_decay=0.02),
    ),
    ("rmsprop-plain", sgdlab.RMSProp, torch.optim.RMSprop, dict(lr=0.01)),
    (
        "rmsprop-centered-momentum",
        sgdlab.RMSProp,
        torch.optim.RMSprop,
        dict(lr=0.003, alpha=0.9, momentum=0.6, centered=True, weight_decay=0.01),
    ),
    (
        "rmsprop-max",
        sgdlab.RMSProp,
        torch.optim.RMSprop,
        dict(lr=0.003, eps=1e-6, maximize=True, momentum=0.3),
    ),
    ("adam-plain", sgdlab.Adam, torch.optim.Adam, dict(lr=0.01)),
    (
        "adam-amsgrad-wd",
        sgdlab.Adam,
        torch.optim.Adam,
        dict(lr=0.01, betas=(0.8, 0.99), amsgrad=True, weight_decay=0.05),
    ),
    (
        "adamw-max",
        sgdlab.Adam,
        torch.optim.Adam,
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    ),
]

VARIANTS = [
    ("rmsprop-inside", sgdlab.RMSProp, dict(lr=0.01, eps=1e-4, eps_placement="inside")),
    ("rmsprop-sigma2", sgdlab.RMSProp, dict(lr=0.001, eps=1e-3, power=1.0, momentum=0.5)),
    (
        "rmsprop-per-example",
        sgdlab.RMSProp,
        dict(lr=0.01, second_moment="per_example", weight_decay=0.1, centered=True),
    ),
    ("adam-lecture", sgdlab.Adam, dict(lr=0.01, bias_correction="lecture")),
    (
        "adam-none-inside",
        sgdlab.Adam,
        dict(lr=0.01, bias_correction="none", eps_placement="inside", eps=1e-6),
    ),
    (
        "adam-per-example-sigma2",
        sgdlab.Adam,
        dict(
            lr=0.001,
            second_moment="per_example",
            power=1.0,
            eps=1e-3,
            weight_decay=0.1,
            maximize=True,
            amsgrad=True,
        ),
    ),
    (
        "sgd-lecture-scaling",
        sgdlab.SGD,
        dict(lr=0.01, momentum=0.9, ref_batch_size=8, scaling="lecture"),
    ),
    ("adam-exact-scaling", sgdlab.Adam, dict(lr=0.01, ref_batch_size=8, scaling="exact")),
    (
        "rmsprop-sqrt-scaling",
        sgdlab.RMSProp,
        dict(lr=0.01, momentum=0.5, ref_batch_size=8, scaling="sqrt"),
    ),
]

#: every option set as (name, sgdlab class, kwargs)
ALL_CASES = [(n, c, k) for n, c, _, k in TORCH_TWINS] + VARIANTS

SHAPES = [(5, 3), (7,), (2, 3, 4), (1,), (4, 1, 2, 2)]


def make_params(seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]


def param_groups(params: list[torch.Tensor], cls) -> list[dict]:
    """Three groups with their own hyperparameters (a scaled lr, an extra option)."""
    first, second, third = params[:2], params[2:4], params[4:]
    extra = {"weight_decay": 0.03} if cls is not sgdlab.SGD else {"lr": 0.011}
    return [{"params": first}, {"params": second, "lr": 0.004}, {"params": third, **extra}]


def set_grads(params: list[torch.Tensor], t: int, per_example: bool = False) -> None:
    """Deterministic, parameter-dependent gradients with noise (a shared seed per step), and
    when asked the per-example second moment of the B = 4 per-example gradients they average."""
    g = torch.Generator().manual_seed(1000 + t)
    for p in params:
        noise = torch.randn((4, *p.shape), generator=g, dtype=p.dtype)
        per = torch.sin(p.detach()).unsqueeze(0) + 0.5 * noise
        p.grad = per.mean(0)
        if per_example:
            p.grad_second_moment = (per * per).mean(0)


def state_tensors(opt) -> dict:
    out = {}
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            for k, v in opt.state[p].items():
                out[(i, j, k)] = v
    return out


def checkpoint(obj):
    """``obj`` after a real save/load round trip (no tensor shared with the original)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def same_structure(a, b) -> bool:
    """Deep equality of state dicts: same keys and types, tensors equal (dtype and shape
    included), other values ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_structure(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(same_structure(x, y) for x, y in zip(a, b))
        )
    return type(a) is type(b) and a == b
