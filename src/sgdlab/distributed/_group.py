"""Where a job stands: rank, world size and the device collectives need.

Every helper works with or without an initialised default process group: without one the job is
a single process (rank 0 of 1) and collectives are skipped, so the same training code runs on one
process and under ``torchrun``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_size", "comm_device"]


def is_distributed(group: Any = None) -> bool:
    """True when torch.distributed is initialised (``group`` then takes part in collectives)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_size(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (the default group when None); ``(0, 1)`` when
    torch.distributed is not initialised."""
    if not is_distributed(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(group: Any = None) -> torch.device:
    """The device small bookkeeping tensors must live on for ``group``'s backend: the current
    CUDA device for NCCL, the CPU otherwise (gloo, or no process group)."""
    if not is_distributed(group):
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
