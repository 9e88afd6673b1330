"""Where the tracker listens for a call's output gradients, so that in-place operations on the
outputs after the call (``nn.ReLU(inplace=True)``, ``out.mul_(...)``) do not hide them.

A pre-hook on the autograd node that produced an output sees the gradient of the output as the
call returned it, also when the output is modified in place later: the in-place operation puts
its own node in front of it. That holds for outputs that are not views. An in-place operation on
a *view* (``nn.Linear`` on ``[B, T, in]`` returns its product reshaped; recurrent layers return
transposes) rebases it: its own node is bypassed and a hook there never fires. Two remedies:

* :func:`view_source`: an output that is a reshape of a tensor made inside the call (the whole
  of it, same layout) is listened for at the node of that tensor, which receives the gradient
  of the output, reshaped, in-place operation or not. No extra work; used for ``torch.nn``'s
  own modules, whose internal tensor feeds nothing else.
* :class:`Tap`: any other outputs (other views, several outputs at once) are replaced by
  aliases made by one autograd function, ``detach()`` of each, sharing memory and version
  counter with the originals, so in-place operations are allowed or refused exactly as without
  the tracker. Its backward hands the gradients of all the call's outputs, as returned, to the
  tracker at once (``None`` for outputs without gradient) and passes them through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Tap", "view_source"]


class Tap(torch.autograd.Function):
    """``Tap.apply(on_grads, *outputs)``: aliases of ``outputs`` whose gradients are handed to
    ``on_grads(grads)`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, on_grads: Callable[[tuple], None], *outputs: Tensor) -> Any:
        ctx.on_grads = on_grads
        ctx.set_materialize_grads(False)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> Any:
        ctx.on_grads(grads)
        return (None, *grads)


def view_source(out: Tensor, inputs: tuple[Any, ...]) -> tuple[Any, int] | None:
    """``(node, output_nr)`` of the tensor that the view ``out`` reshapes, where ``out`` is all
    of it in the same contiguous layout and it is not one of the call's ``inputs`` (nor their
    base); ``None`` otherwise."""
    base = out._base
    if (
        base is None
        or base.grad_fn is None
        or out.numel() != base.numel()
        or out.storage_offset() != base.storage_offset()
        or not out.is_contiguous()
        or not base.is_contiguous()
    ):
        return None
    for x in inputs:
        if isinstance(x, Tensor) and (x is base or x._base is base):
            return None
    return base.grad_fn, base.output_nr
