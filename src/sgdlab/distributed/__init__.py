"""Data-parallel training on torch.distributed with a global batch and global statistics.

A step on ``W`` ranks with ``k`` micro-batches each equals one single-process step on the
concatenated batch: the batch size ``B`` the scaling rules see is global
(:func:`gather_batch`), the gradient is the example-weighted mean over all ranks, and the
per-example second moments and noise statistics are summed across ranks with one flattened
all-reduce per step (:class:`SecondMomentReducer`). :class:`DataParallel` drives all of it
around ``torch.nn.parallel.DistributedDataParallel``; :mod:`.launch` starts jobs (torchrun,
``spawn``); checkpoints are written once and load on any world size.
"""

from __future__ import annotations

from .batch import GlobalBatch, gather_batch
from .checkpoint import load_checkpoint, save_checkpoint
from .launch import (
    free_port,
    init_from_env,
    launched_by_torchrun,
    run_with_torchrun,
    spawn,
    strip_nproc,
    torchrun_command,
)
from .moments import SecondMomentReducer
from .parallel import DataParallel

__all__ = [
    "DataParallel",
    "GlobalBatch",
    "SecondMomentReducer",
    "free_port",
    "gather_batch",
    "init_from_env",
    "launched_by_torchrun",
    "load_checkpoint",
    "run_with_torchrun",
    "save_checkpoint",
    "spawn",
    "strip_nproc",
    "torchrun_command",
]
