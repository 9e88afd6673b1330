"""Checkpoints of data-parallel runs: written once, read on any world size.

Every rank holds the same parameters and optimizer state (the state of replicated data
parallelism is not sharded), so rank 0 alone writes them: to a temporary file in the target
directory, then ``os.replace`` (atomic on POSIX), so a run killed while saving leaves the previous
checkpoint intact. A barrier follows so no rank runs ahead of a checkpoint that does not exist
yet. Loading needs no communication: every rank reads the same file.

A :class:`sgdlab.stats.NoiseMeter` given as ``noise_meter`` travels with the checkpoint (its
smoothed averages and counters, :meth:`~sgdlab.stats.NoiseMeter.state_dict`, under the key
``"noise_meter"``), so its smoothed readings continue after a resume instead of restarting::

    save_checkpoint(dp.state_dict, path, noise_meter=dp.meter)
    dp.load_state_dict(load_checkpoint(path, noise_meter=dp.meter))
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

from ..stats import NoiseMeter
from ._group import is_distributed, rank_and_size

__all__ = ["METER_KEY", "save_checkpoint", "load_checkpoint"]

#: key of the noise meter's state in a checkpoint
METER_KEY = "noise_meter"


def _check_meter(noise_meter: Any) -> None:
    if noise_meter is not None and not isinstance(noise_meter, NoiseMeter):
        raise TypeError(
            f"noise_meter must be a sgdlab.stats.NoiseMeter or None, got "
            f"{type(noise_meter).__name__}"
        )


def save_checkpoint(
    state: dict[str, Any] | Callable[[], dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    group: Any = None,
    noise_meter: NoiseMeter | None = None,
) -> Path:
    """Write ``state`` (or ``state()``, evaluated on rank 0 only) to ``path`` from rank 0,
    atomically, then barrier. Returns the path. With ``noise_meter`` its
    ``state_dict()`` is stored under ``"noise_meter"`` (``state`` must not use that key)."""
    _check_meter(noise_meter)
    path = Path(path)
    rank, world = rank_and_size(group)
    if rank == 0:
        data = state() if callable(state) else state
        if noise_meter is not None:
            if not isinstance(data, dict):
                raise TypeError(
                    f"state must be a dict to carry the noise meter, got {type(data).__name__}"
                )
            if METER_KEY in data:
                raise ValueError(
                    f"state already has a {METER_KEY!r} entry; pass the meter "
                    "either inside state or as noise_meter, not both"
                )
            data = {**data, METER_KEY: noise_meter.state_dict()}
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
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    noise_meter: NoiseMeter | None = None,
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors, numbers, strings only:
    loaded with ``weights_only=True``). With ``noise_meter``, restore it from the stored
    ``"noise_meter"`` entry (``ValueError`` if the checkpoint has none)."""
    _check_meter(noise_meter)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path must be an existing checkpoint file, got {str(path)!r}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if noise_meter is not None:
        if not isinstance(state, dict) or METER_KEY not in state:
            raise ValueError(
                f"checkpoint {str(path)!r} holds no noise-meter state (save it "
                "with save_checkpoint(..., noise_meter=meter))"
            )
        noise_meter.load_state_dict(state[METER_KEY])
    return state
