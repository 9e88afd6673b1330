"""Calls held for the end of the backward pass (:class:`Deferred`).

A short-path call (:class:`~sgdlab.stats._registry.FastPath`) of a lane (2-D ``nn.Linear``)
waits for the end of the pass, where the lane computes all of them together (the squares of all
calls one multi-tensor kernel; on a GPU with Triton one fused kernel for up to four layers); a
call for a ``moments`` function waits too when its input and output gradient hold at most
:data:`DEFER_BYTES`, larger ones are computed as their gradient arrives. The held calls are
computed early once the tensors they hold outgrow the tracker's ``memory_budget``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._base import without_grad
from ._record import Record, shared

__all__ = ["DEFER_BYTES", "Deferred", "on_lane", "on_moments"]

# short-path calls whose input and output gradient hold at most this many bytes are computed
# with the Linear lane at the end of the pass: for such calls the host's work is the cost, and
# back to back it is cheaper than interleaved with the backward pass (benchmarks/README.md);
# larger calls run as their gradient arrives
DEFER_BYTES = 2**20


class Deferred:
    """The held calls of one pass: ``(record, output gradient, moments function or None for
    the call's lane)``, and the bytes they hold."""

    __slots__ = ("items", "nbytes")

    def __init__(self) -> None:
        self.items: list[tuple[Record, Tensor, Any]] = []
        self.nbytes = 0

    def add(self, state: Any, record: Record, d: Tensor, moments: Any, nbytes: int) -> None:
        """Hold a call (``nbytes``: its input and output gradient); all are computed now when
        they hold more than the memory budget."""
        self.items.append((record, d, moments))
        held = self.nbytes = self.nbytes + nbytes
        if held > state.budget(d):
            self.flush(state)

    def flush(self, state: Any) -> None:
        """Compute the held calls into ``state`` (the :class:`~sgdlab.stats._pass.Pass`):
        ``moments`` calls one by one, then each lane's calls together; calls of a shared
        parameter take the general rule (per-example gradients summed over uses)."""
        items, self.items, self.nbytes = self.items, [], 0
        lanes: dict[Any, tuple[list, list]] = {}
        for record, d, moments in items:
            if moments is not None:
                state.moments_now(moments, record, d)
                continue
            entry = record.entry
            if shared(entry, record.uses):
                state.compute_general(record, d)
                continue
            calls, entries = lanes.setdefault(entry.fast.lane, ([], []))
            w = entry.params[0]
            calls.append((entry.has_weight, entry.has_bias, w.dtype, record.args[0], d))
            entries.append(entry)
        for lane, (calls, entries) in lanes.items():
            results = without_grad(lane, calls, state.scale)
            for entry, moments_of_call in zip(entries, results, strict=True):
                state.set_moments(entry, moments_of_call)


def on_lane(state: Any, record: Record, d: Tensor) -> None:
    """A call of its fast path's lane: held for the end of the pass."""
    state.deferred.add(state, record, d, None, record.args[0].nbytes + d.nbytes)


def on_moments(moments: Any, state: Any, record: Record, d: Tensor) -> None:
    """A call for ``moments``: held if small (:data:`DEFER_BYTES`), else computed now."""
    nbytes = record.args[0].nbytes + d.nbytes
    if nbytes <= DEFER_BYTES:
        state.deferred.add(state, record, d, moments, nbytes)
    else:
        state.moments_now(moments, record, d)
