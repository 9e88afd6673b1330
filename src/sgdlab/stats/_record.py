"""A call of a tracked module: its module's :class:`Entry` (what the tracker attached) and the
:class:`Record` a forward hook keeps until the call's output gradients arrive (one type for the
short paths and the general path)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _saved
from ._registry import FastPath, Rule

__all__ = [
    "Entry",
    "Record",
    "changed",
    "check_state",
    "differentiable",
    "positional",
    "shared",
    "unpacked",
]


@dataclass(slots=True)
class Entry:
    module: nn.Module
    name: str
    rule: Rule
    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    ids: tuple[int, ...] = ()
    label: str = ""
    plain: bool = False  # no input check, batch size = first dimension of the first input
    fast: FastPath | None = None  # the rule's short path, if this tracker takes it
    has_weight: bool = False  # short paths: which of weight, bias (in this order) are tracked
    has_bias: bool = False
    # a parametrized module: its parametrizations' buffers and their versions before the
    # running call (:meth:`Tracker._before_call`)
    buffers: tuple[tuple[str, Tensor], ...] = ()
    versions: tuple[int, ...] = ()
    # 1: the module sees [T, B, ...] inputs (inside a torch transformer with batch_first=False)
    batch_dim: int = 0
    # attention and recurrent layers with dropout, fallback modules: the generator states
    # before the running call (:meth:`Tracker._before_call`)
    dropout: bool = False
    rng: Any = None
    # fallback modules: their buffers and versions before the running call (a forward pass
    # that changes them is refused: :func:`_check_state`)
    state: tuple[tuple[str, Tensor, int], ...] | None = None


@dataclass(slots=True)
class Record:
    entry: Entry
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    versions: tuple[int, ...]
    inputs: tuple[Tensor, ...]
    batch_size: int
    uses: dict[int, int]
    out_spec: Any
    positions: tuple[int, ...]
    # under saved-tensor hooks: (flattened args and kwargs with SavedTensor for tensors, spec);
    # args and kwargs are unpacked from it when the output gradients arrive
    saved: Any = None
    buffers: dict[str, Tensor] | None = None  # see Call.buffers
    rng: Any = None  # see Call.rng
    outputs: tuple[tuple[Tensor, int], ...] | None = None  # see Call.outputs


@functools.cache
def forward_params(cls: type) -> tuple[str, ...]:
    """Names of the parameters of ``cls.forward`` after ``self`` that may be passed by
    position, in order (empty where the signature cannot be read)."""
    try:
        sig = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return ()
    names = []
    for p in list(sig.parameters.values())[1:]:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return tuple(names)


def positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call's keyword arguments that fill the next positional parameters of its forward
    moved into ``args`` (``linear(input=x)`` becomes ``linear(x)``): the rules read a layer's
    input as ``args[0]``."""
    names = forward_params(type(module))[len(args) :]
    if not names or names[0] not in kwargs:
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for name in names:
        if name not in kwargs:
            break
        args.append(kwargs.pop(name))
    return tuple(args), kwargs


def shared(entry: Entry, uses: dict[int, int]) -> bool:
    """Whether a parameter of ``entry`` was used more than once in the forward pass (its
    per-example gradients must be summed over uses before squaring: the general rule)."""
    for pid in entry.ids:
        if uses[pid] > 1:
            return True
    return False


def differentiable(output: Any) -> tuple[list[Tensor], tuple[int, ...], Any, list | None] | None:
    """The outputs of a call that require grad: ``(tensors, their positions among the leaves,
    the output's pytree spec, the leaves)``, the spec and leaves ``None`` for a single tensor;
    ``None`` when no output requires grad."""
    if isinstance(output, Tensor):  # the common case, without pytree overhead
        return ([output], (0,), None, None) if output.requires_grad else None
    leaves, spec = tree_flatten(output)
    positions = tuple(i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad)
    if not positions:
        return None
    return [leaves[i] for i in positions], positions, spec, leaves


def changed(entry: Entry) -> dict[str, Tensor] | None:
    """Copies of the buffers of a parametrized module that its call just changed (spectral
    norm's power iteration): the call's statistics are computed with these values later."""
    if len(entry.versions) != len(entry.buffers):  # the pre-hook did not see this call
        return None
    changed = {
        n: b.detach().clone()
        for (n, b), v in zip(entry.buffers, entry.versions, strict=True)
        if b._version != v
    }
    return changed or None


def check_state(entry: Entry) -> None:
    """Refuse a call of a fallback module whose forward pass changed one of its buffers (in
    place or by assigning a new tensor): the fallback reruns the forward once per example,
    which would update the state again from one example, with other values than the batched
    call used (a running mean of the batch), and leave the module holding its tensors."""
    state, entry.state = entry.state, None
    module = entry.module
    changed = []
    for name, buffer, version in state or ():
        try:
            now = module.get_buffer(name)
        except AttributeError:
            now = None
        if now is not buffer or buffer._version != version:
            changed.append(name)
    if changed:
        raise ValueError(
            f"sgdlab.stats: {entry.name + ' ' if entry.name else ''}({type(module).__name__}) "
            f"changed its buffers {changed} in its forward pass, which the per-example fallback "
            "cannot rerun per example: update them outside the forward, or give the module a "
            "rule (sgdlab.stats.register_rule)"
        )


def unpacked(record: Record) -> Record:
    """``record`` with its saved inputs (``Tracker._saved_forward``) unpacked into ``args``
    and ``kwargs``."""
    saved, spec = record.saved
    flat = [_saved.unpack(t) if isinstance(t, _saved.SavedTensor) else t for t in saved]
    args, kwargs = tree_unflatten(flat, spec)
    return Record(
        record.entry,
        args,
        kwargs,
        (),
        (),
        record.batch_size,
        record.uses,
        record.out_spec,
        record.positions,
        None,
        record.buffers,
        record.rng,
    )
