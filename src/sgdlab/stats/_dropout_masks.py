"""Dropout and random draws inside a module on the ``torch.func`` fallback: the forward pass's
masks and draws, per example.

The fallback reruns a module once per example (``vmap``), where a dropout call cannot redraw
the masks the batched forward pass drew. So the batched call is rerun first, from the generator
states recorded just before it (:mod:`sgdlab.stats._rng`), under :class:`Capture`: each active
dropout call (``F.dropout``, ``dropout1d/2d/3d``, ``alpha_dropout``, ``feature_alpha_dropout``,
``torch.dropout``; so ``nn.Dropout`` and its kin) draws as it did in the forward pass, and its
effect is recorded as the affine map ``y = A * x + C`` it applied (``A = f(1) - f(0)``,
``C = f(0)``, each evaluated from the same generator state, then ``f(x)`` from it again, so the
draws that follow are unchanged; ``C`` is zero except for alpha dropout). In the per-example
rerun :class:`Substitute` replaces the k-th active call by ``A_k[b] * x + C_k[b]``, split along
the axis that holds the batch; masks shared by the batch (a dropped-out weight) apply whole. Which
axis holds the batch comes from an eager rerun of one example under :class:`Probe`, which
records the shapes of its draws (:func:`batch_axes`), not from sizes alone (a weight with as many
rows as the batch has examples is still shared). Other random
draws of the default generators (``torch.rand``, ``randn``, ``bernoulli`` and their ``_like``
forms, in-place fills such as ``x.new_empty(shape).bernoulli_(p)`` of stochastic depth) are
recorded as they come out and handed back, example b's share, in the per-example rerun. Draws
of other kinds (``randperm``, ``multinomial``, a generator of one's own) are refused by
``vmap(randomness="error")`` or here, as is dropout inside fused kernels (attention's
``dropout_p``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import _rng

__all__ = ["Capture", "NeedMasks", "Probe", "Substitute", "batch_axes"]

_DROPOUTS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
}
# random fills of a tensor in place, and functions returning a fresh random tensor
_FILLS = {
    torch.Tensor.bernoulli_,
    torch.Tensor.uniform_,
    torch.Tensor.normal_,
    torch.Tensor.exponential_,
    torch.Tensor.geometric_,
    torch.Tensor.cauchy_,
    torch.Tensor.log_normal_,
    torch.Tensor.random_,
}
_DRAWS = {
    torch.bernoulli,
    torch.rand,
    torch.randn,
    torch.rand_like,
    torch.randn_like,
    torch.randint,
    torch.randint_like,
    torch.normal,
    torch.poisson,
    torch.Tensor.bernoulli,
}


def _draw(func: Any, kwargs: dict) -> bool:
    """Whether ``func`` is a random draw this module replays (of the default generators)."""
    if func not in _FILLS and func not in _DRAWS:
        return False
    if kwargs.get("generator") is not None:
        raise ValueError(
            "a random draw with a generator of its own inside a module on the per-example "
            "fallback cannot be reproduced per example; draw from the default generator"
        )
    return True


def _active(func: Any, args: tuple, kwargs: dict) -> Tensor | None:
    """The input of an active dropout call, else ``None``."""
    if func not in _DROPOUTS:
        if func is F.scaled_dot_product_attention:
            p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            if p and p > 0:
                raise ValueError(
                    "scaled_dot_product_attention with dropout_p > 0 inside a module on the "
                    "per-example fallback: its masks are drawn inside the fused kernel and "
                    "cannot be reproduced per example; use dropout_p=0 (or nn.Dropout on the "
                    "attention weights, or nn.MultiheadAttention, which has a rule)"
                )
        return None
    names = ("input", "p", "train") if func is torch.dropout else ("input", "p", "training")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    p = bound.get("p", 0.5)
    training = bound.get(names[2], func is torch.dropout)
    return bound["input"] if training and p > 0 else None


class Capture(TorchFunctionMode):
    """Rerun of the batched call: records ``(A, C)`` of each active dropout call and ``(R,)``
    of each other random draw, in order."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.maps: list[tuple[Tensor, ...]] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if _draw(func, kwargs):
            out = func(*args, **kwargs)
            self.maps.append((out.detach().clone(),))
            return out
        x = _active(func, args, kwargs)
        if x is None:
            return func(*args, **kwargs)
        state = _rng.state(self.device)
        rest, rest_kw = args[1:], {k: v for k, v in kwargs.items() if k != "inplace"}
        zero = func(torch.zeros_like(x), *rest, **rest_kw)
        _rng.restore(state)
        one = func(torch.ones_like(x), *rest, **rest_kw)
        _rng.restore(state)
        self.maps.append((one - zero, zero))
        return func(*args, **kwargs)


class Probe(TorchFunctionMode):
    """Eager rerun of one example (its inputs with a batch axis of size one): the shape of each
    active dropout call's input and of each other random draw, in order, so that each recorded
    map is split along the axis where the batched call had the batch (:func:`batch_axes`)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[torch.Size] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if _draw(func, kwargs):
            out = func(*args, **kwargs)
            self.shapes.append(out.shape)
            return out
        x = _active(func, args, kwargs)
        if x is not None:
            self.shapes.append(x.shape)
        return func(*args, **kwargs)


def batch_axes(
    maps: list[tuple[Tensor, ...]], shapes: list[torch.Size], B: int, what: str
) -> list[tuple[int | None, ...]]:
    """For each recorded map, the axis of each of its tensors that holds the batch (``None``:
    shared by the examples, applied whole), from the batched call's shape and one example's
    (``shapes``, :class:`Probe`): the same shape is a draw shared by the batch (noise per
    feature, a dropped-out weight, whatever its size); one axis of size B that is 1 for the
    example is the batch, wherever it is. Anything else cannot be split: refused."""
    if len(shapes) != len(maps):
        raise RuntimeError(
            f"{what}: the random draws per example differ from those of the batched call; the "
            "module's randomness must not depend on the batch"
        )
    axes: list[tuple[int | None, ...]] = []
    for m, one in zip(maps, shapes, strict=True):
        full = m[0].shape
        if len(m) == 2:  # a dropout map (A, C) broadcasts against its input
            full = torch.broadcast_shapes(m[0].shape, m[1].shape, one)
        if full == one:
            axes.append((None,) * len(m))
            continue
        diff = [k for k in range(len(full)) if len(full) == len(one) and full[k] != one[k]]
        if len(diff) != 1 or full[diff[0]] != B or one[diff[0]] != 1:
            raise ValueError(
                f"{what}: a random draw or dropout call inside the module has shape "
                f"{tuple(full)} in the batched call and {tuple(one)} for one example; it "
                "cannot be split per example"
            )
        axes.append(tuple(_aligned(t, diff[0] - len(full), B) for t in m))
    return axes


def _aligned(t: Tensor, k: int, B: int) -> int | None:
    """The axis of ``t`` that broadcasts to axis ``k`` (counted from the end) of the call's
    shape, if ``t`` has the batch there; ``None``: ``t`` is shared along it (size one or
    missing)."""
    axis = t.dim() + k
    return axis if axis >= 0 and t.shape[axis] == B else None


class NeedMasks(Exception):
    """Raised by :class:`Substitute` without maps at the first active dropout call: the
    fallback then records the maps (:class:`Capture`) and starts again."""


class Substitute(TorchFunctionMode):
    """Per-example rerun: the k-th active dropout call applies the k-th recorded map
    (``maps=None``: none recorded yet, raise :class:`NeedMasks` at an active call)."""

    def __init__(self, maps: list[tuple[Tensor, ...]] | None, what: str) -> None:
        super().__init__()
        self.maps = maps
        self.what = what
        self.k = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        draw = _draw(func, kwargs)
        x = None if draw else _active(func, args, kwargs)
        if x is None and not draw:
            return func(*args, **kwargs)
        if self.maps is None:
            raise NeedMasks
        if self.k >= len(self.maps) or len(self.maps[self.k]) != (1 if draw else 2):
            raise RuntimeError(
                f"{self.what}: the random draws per example differ from those of the batched "
                "call; the module's randomness must not depend on the batch"
            )
        recorded = self.maps[self.k]
        self.k += 1
        if draw:  # the forward pass's draw, this example's share
            r = recorded[0]
            if func in _FILLS:
                return args[0].copy_(r)
            return r.clone()
        a, c = recorded
        if torch.broadcast_shapes(x.shape, a.shape, c.shape) != x.shape:
            raise ValueError(
                f"{self.what}: a dropout call inside the module acts on a tensor of shape "
                f"{tuple(x.shape)} for one example, against masks of shape {tuple(a.shape)}; "
                "they cannot be split per example"
            )
        if kwargs.get("inplace", False):
            return x.mul_(a).add_(c)
        return x * a + c
