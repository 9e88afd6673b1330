r"""The global batch of a data-parallel step.

One optimizer step on ``W`` ranks, each accumulating ``k`` micro-batches, averages the loss over

    B = sum_r n_r,     n_r = sum_{j<k} n_{r,j}   (the examples rank r sees in the step),

which is ``per-rank batch x W x k`` when every micro-batch holds the same number of examples.
``B`` is the batch size of the batch-size scaling rules (:mod:`sgdlab.hyper`): a step on ``W``
ranks must behave as one single-process step on the ``B`` concatenated examples (Goyal et al.
2017, "Accurate, large minibatch SGD: training ImageNet in 1 hour", section 2).

:func:`gather_batch` all-gathers ``(n_r, k_r)`` once per step, before any gradient is
communicated, so a disagreement is reported by every rank as a :class:`ValueError` instead of
a hang in a later collective. Ranks must agree on ``k`` (the number of synchronised backward
passes differs otherwise); their local sizes ``n_r`` may differ. Unequal local batches are
exact: DDP averages gradients uniformly over ranks, so the micro-batch loss of ``n`` examples
on a rank is multiplied by :meth:`GlobalBatch.loss_scale` ``= W n / B`` before backward, which
turns the uniform average into the example-weighted mean ``(1/B) sum_b g_b``.

Example::

    >>> from sgdlab.distributed import gather_batch
    >>> batch = gather_batch(32, accumulation_steps=4)   # one process: B = 32
    >>> batch.size, batch.world_size, batch.loss_scale(8)
    (32, 1, 0.25)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .._validation import check_batch_size, check_count
from ._group import comm_device, is_distributed, rank_and_size

__all__ = ["GlobalBatch", "check_examples", "gather_batch"]


@dataclass(frozen=True)
class GlobalBatch:
    """The examples of one step on every rank.

    Attributes:
        local_sizes: ``n_r`` for each rank r (examples over all micro-batches of the step).
        accumulation_steps: ``k``, micro-batches per step (equal on every rank).
        rank: this process's rank.
    """

    local_sizes: tuple[int, ...]
    accumulation_steps: int
    rank: int

    @property
    def size(self) -> int:
        """The global batch ``B = sum_r n_r``."""
        return sum(self.local_sizes)

    @property
    def world_size(self) -> int:
        return len(self.local_sizes)

    @property
    def local_size(self) -> int:
        """``n_r`` of this rank."""
        return self.local_sizes[self.rank]

    def loss_scale(self, micro_batch_size: int) -> float:
        """Factor ``W n / B`` for the mean loss of a micro-batch of ``n`` examples on this rank:
        after DDP's uniform average over ranks and the accumulation over micro-batches,
        ``p.grad`` is the mean gradient over the ``B`` examples of the step."""
        n = check_batch_size("micro_batch_size", micro_batch_size)
        return self.world_size * n / self.size


def gather_batch(
    local_size: int,
    accumulation_steps: int = 1,
    *,
    group: Any = None,
    equal_local: bool = False,
) -> GlobalBatch:
    """All-gather every rank's ``(local_size, accumulation_steps)`` (one small collective).

    Args:
        local_size: examples this rank processes in the step, over all its micro-batches.
        accumulation_steps: micro-batches (backward passes) per step on this rank.
        group: process group (default: the default group; no collective without one).
        equal_local: also require every rank to hold the same number of examples.

    Raises:
        ValueError: on every rank, when ranks disagree on ``accumulation_steps`` (or on
            ``local_size`` with ``equal_local``), or when a rank has fewer examples than
            micro-batches. The message lists every rank's values.
    """
    n = check_batch_size("local_size", local_size)
    k = check_count("accumulation_steps", accumulation_steps)
    rank, world = rank_and_size(group)
    if is_distributed(group) and world > 1:
        mine = torch.tensor([n, k], dtype=torch.int64, device=comm_device(group))
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        rows = [(int(t[0]), int(t[1])) for t in parts]
    else:
        rows = [(n, k)]
    sizes = tuple(r[0] for r in rows)
    steps = tuple(r[1] for r in rows)
    table = ", ".join(
        f"rank {i}: {a} examples in {b} micro-batches" for i, (a, b) in enumerate(rows)
    )
    if len(set(steps)) > 1:
        raise ValueError(
            "accumulation_steps must be equal on every rank (each micro-batch's backward pass "
            f"is a collective), got {table}"
        )
    if equal_local and len(set(sizes)) > 1:
        raise ValueError(
            f"local batch sizes must be equal on every rank (equal_local=True), got {table}"
        )
    short = [i for i, (a, b) in enumerate(rows) if a < b]
    if short:
        raise ValueError(
            "every micro-batch needs at least one example: local_size must be >= "
            f"accumulation_steps on every rank, got {table}"
        )
    return GlobalBatch(local_sizes=sizes, accumulation_steps=k, rank=rank)


def check_examples(seen: int, declared: int, remaining: int, *, group: Any = None) -> None:
    """Every rank's examples so far in a step against the ``local_size`` it declared: one small
    all-gather, called by every rank before a backward pass that exchanges gradients.

    A rank is wrong when ``seen + remaining`` (one example for each micro-batch still to come)
    exceeds ``declared``, or, at the last micro-batch (``remaining = 0``), differs from it.

    Raises:
        ValueError: on every rank, the same message (each rank's ``seen of declared``), when
            any rank is wrong; nothing has been exchanged by this step's backward pass yet.
    """
    rank, world = rank_and_size(group)
    if is_distributed(group) and world > 1:
        mine = torch.tensor(
            [seen, declared, remaining], dtype=torch.int64, device=comm_device(group)
        )
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        rows = [tuple(int(v) for v in t) for t in parts]
    else:
        rows = [(seen, declared, remaining)]
    bad = [i for i, (a, n, r) in enumerate(rows) if a + r > n or (r == 0 and a != n)]
    if bad:
        table = ", ".join(
            f"rank {i}: {a} of {n}" + (f" and {r} micro-batches to come" if r else "")
            for i, (a, n, r) in enumerate(rows)
        )
        raise ValueError(
            f"micro-batch examples must add up to begin_step's local_size on every rank; rank "
            f"{bad[0]} differs ({table}); the step is abandoned on every rank"
        )
