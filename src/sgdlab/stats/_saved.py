"""Module inputs kept the way autograd keeps its saved tensors.

A tracked module's inputs are needed again when its output gradient arrives. Holding the
tensors themselves from the forward to the backward pass defeats the tools that manage the
memory of saved activations through saved-tensor hooks
(``torch.autograd.graph.saved_tensors_hooks``):

* activation checkpointing, ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``,
  frees the activations of a region after its forward pass and recomputes them when the
  backward pass needs them;
* offloading, ``torch.autograd.graph.save_on_cpu``, moves them to host memory.

So while such hooks are active the tracker keeps each input as an autograd ``SavedTensor``
(:func:`save`): it passes through the same hooks as the model's own saved activations (freed and
recomputed, or offloaded and brought back) and is unpacked once, when the output gradient
arrives (:func:`unpack`). Without hooks the tensors are held as they are (no cost).

Recomputation. Non-reentrant checkpointing reruns the forward of the region during backward and
matches the tensors saved by the rerun to those saved by the first run *by order*. The tracker's
forward hooks therefore save the same inputs in the same order in both runs, whatever else they
do (a call inside :meth:`~sgdlab.stats.Tracker.paused` saves too, and drops its saved inputs):
the rerun's saves fill in the first run's ``SavedTensor`` objects, and the rerun records nothing
(:func:`recomputing`), since its graph is never differentiated. Reentrant checkpointing runs the
first forward without grad (nothing recorded) and differentiates the rerun's graph, whose calls
are recorded as usual. The tracker must stay attached from such a forward pass to its backward
pass: attaching or detaching in between changes the number of tensors the rerun saves, which
checkpointing refuses (``CheckpointError``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch._C._autograd import SavedTensor

__all__ = ["SavedTensor", "hooks", "recomputing", "save", "unpack", "without_hooks"]

_top = torch._C._autograd._top_saved_tensors_default_hooks
_make = torch._C._autograd._make_saved_tensor
_push = torch._C._autograd._push_saved_tensors_default_hooks
_pop = torch._C._autograd._pop_saved_tensors_default_hooks


def hooks() -> Any:
    """The innermost active saved-tensor hooks ``(pack, unpack)``, or ``None``; ``None`` while
    ``torch.compile`` traces a forward hook (which it cannot do past this C function: the hook
    then keeps its inputs as tensors, as without hooks)."""
    if torch.compiler.is_compiling():
        return None
    return _top(False)


def recomputing(active: Any) -> bool:
    """Whether ``active`` (from :func:`hooks`) are those of non-reentrant checkpointing's
    recomputation, i.e. the forward running now is a rerun whose saved tensors replace freed
    ones. Should torch rename them, the rerun's calls are recorded too: still exact (each
    parameter counts as used twice, so it takes the per-example path), only slower."""
    return getattr(active[0], "__qualname__", "").startswith("_recomputation_hook.")


def save(t: Tensor) -> SavedTensor:
    """``t`` through the active saved-tensor hooks (their pack function runs now)."""
    return _make(t, is_output=False)


def unpack(s: SavedTensor) -> Tensor:
    """The tensor saved by :func:`save`, detached (the unpack function runs now; under
    checkpointing this may recompute the region's forward)."""
    return s.unpack().detach()


@contextlib.contextmanager
def without_hooks() -> Iterator[None]:
    """Run a block with no saved-tensor hooks active, and restore them after. The layer rules
    run inside the backward pass, and one called there inside a user's ``save_on_cpu`` block
    would have its own temporaries offloaded, or fail (``torch.func``, which the fallback rule
    uses, refuses saved-tensor hooks)."""
    stack = []
    while (top := _top(False)) is not None:
        stack.append(top)
        _pop()
    try:
        yield
    finally:
        for pack, unpack_ in reversed(stack):
            _push(pack, unpack_)
