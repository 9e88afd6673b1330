"""Checkpoints of data-parallel runs: written once, read on any world size.

Every rank holds the same parameters and optimizer state (the state of replicated data
parallelism is not sharded), so rank 0 alone writes them: to a temporary file in the target
directory, then ``os.replace`` (atomic on POSIX), so a run killed while saving leaves the previous
checkpoint intact. A barrier follows so no rank runs ahead of a checkpoint that does not exist
yet. Loading needs no communication: every rank reads the same file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ._group import is_distributed, rank_and_size

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(
    state: dict[str, Any] | Callable[[], dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    group: Any = None,
) -> Path:
    """Write ``state`` (or ``state()``, evaluated on rank 0 only) to ``path`` from rank 0,
    atomically, then barrier. Returns the path."""
    path = Path(path)
    rank, world = rank_and_size(group)
    if rank == 0:
        data = state() if callable(state) else state
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    if is_distributed(group) and world > 1:
        dist.barrier(group=group)
    return path


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors, numbers, strings only:
    loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path must be an existing checkpoint file, got {str(path)!r}")
    return torch.load(path, map_location=map_location, weights_only=True)

