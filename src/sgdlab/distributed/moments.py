r"""Global per-example second moments: one flattened all-reduce per step.

After the backward passes of a step, rank r's tracked parameters hold
``p.grad_second_moment = c sum_{b on r} g_b * g_b`` (the tracker's normalisation, ``c`` the same
on every rank; see :class:`sgdlab.distributed.DataParallel`). The global statistic of the
concatenated batch is

    m = (1/B) sum_r sum_{b on r} g_b * g_b = s * sum_r m_r,

a sum over ranks. :class:`SecondMomentReducer` copies every ``m_r`` into one contiguous buffer
per dtype (the order of the tracked parameters, identical on every rank), scales it by ``s``,
launches one asynchronous ``all_reduce(SUM)`` and, on :meth:`SecondMomentReducer.wait`, points
each ``p.grad_second_moment`` at its slice of the reduced buffer. A parameter without a second
moment on some rank (not used by that rank's examples) contributes zeros, so the buffer has the
same layout on every rank. Bytes on the wire per step: ``sum_p numel(p) * itemsize`` (the same
as the gradients), i.e. ``2 (W-1)/W`` times that per rank for a ring all-reduce.

The sum is the same on every rank (a collective returns one result), so the second moments, and
with them the optimizer state of RMSProp/Adam with ``second_moment="per_example"``, stay
bit-identical across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..stats.tracker import ATTRIBUTE
from ._group import is_distributed, rank_and_size

__all__ = ["SecondMomentReducer"]


class SecondMomentReducer:
    """Flatten, all-reduce and scatter back ``p.grad_second_moment`` of ``params``.

    Args:
        params: the tracked parameters, in the same order on every rank.
        group: process group (default group; without torch.distributed only the scale applies).
    """

    def __init__(self, params: Sequence[Tensor], *, group: Any = None) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("params must hold at least one parameter, got none")
        self.group = group
        self._layout: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            self._layout.setdefault((p.device, p.dtype), []).append(i)
        self._pending: list[tuple[list[int], Tensor, Any]] = []

    @property
    def nbytes(self) -> int:
        """Bytes of the flattened buffers (the payload of one step's all-reduce)."""
        return sum(p.numel() * p.element_size() for p in self.params)

    @property
    def pending(self) -> bool:
        """An all-reduce was launched and not yet waited for."""
        return bool(self._pending)

    @torch.no_grad()
    def launch(self, scale: float = 1.0) -> None:
        """Flatten the local second moments, multiply by ``scale`` and start the all-reduce."""
        if self._pending:
            raise RuntimeError("the previous all-reduce of second moments was not waited for")
        _, world = rank_and_size(self.group)
        communicate = is_distributed(self.group) and world > 1
        for (device, dtype), idx in self._layout.items():
            pieces = []
            for i in idx:
                p = self.params[i]
                m = getattr(p, ATTRIBUTE, None)
                pieces.append(
                    torch.zeros(p.numel(), device=device, dtype=dtype)
                    if m is None
                    else m.detach().reshape(-1).to(dtype)
                )
            buf = torch.cat(pieces)
            if scale != 1.0:
                buf.mul_(scale)
            work = dist.all_reduce(buf, group=self.group, async_op=True) if communicate else None
            self._pending.append((idx, buf, work))

    @torch.no_grad()
    def wait(self) -> None:
        """Wait for the all-reduce and set every parameter with a gradient to its global second
        moment (a view into the reduced buffer); parameters without a gradient get ``None``."""
        pending, self._pending = self._pending, []
        for idx, buf, work in pending:
            if work is not None:
                work.wait()
            offset = 0
            for i in idx:
                p = self.params[i]
                n = p.numel()
                value = buf[offset : offset + n].view_as(p) if p.grad is not None else None
                setattr(p, ATTRIBUTE, value)
                offset += n
