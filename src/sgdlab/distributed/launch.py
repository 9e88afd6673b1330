"""Starting data-parallel jobs: ``torchrun`` for scripts and the CLI, ``spawn`` from Python.

* :func:`init_from_env` is what a script started by ``torchrun`` calls first: it reads the
  rendezvous variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``), picks NCCL with one GPU per process when CUDA is available
  and gloo otherwise, and initialises the default process group with a timeout, so a rank that
  dies makes the others fail instead of waiting forever.
* :func:`torchrun_command` / :func:`run_with_torchrun` start ``python -m torch.distributed.run``
  on a module (by default the ``sgdlab`` CLI) with ``--nproc-per-node N``: what
  ``sgdlab run NAME --nproc N`` does.
* :func:`spawn` runs ``fn(rank, world_size, *args)`` in ``nproc`` fresh processes on this
  machine (``torch.multiprocessing``, localhost rendezvous on a free port), for notebooks and
  tests; the first rank that raises stops the job and its traceback is re-raised.

Example::

    >>> import sgdlab.distributed as sd
    >>> sd.torchrun_command(["run", "data_parallel"], 2)[1:6]
    ['-m', 'torch.distributed.run', '--standalone', '--nnodes=1', '--nproc-per-node=2']
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .._validation import check_count, check_positive

__all__ = [
    "TORCHRUN_VARIABLES",
    "free_port",
    "init_from_env",
    "launched_by_torchrun",
    "run_with_torchrun",
    "spawn",
    "strip_nproc",
    "torchrun_command",
]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LOCALHOST = "127.0.0.1"


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (its rendezvous variables are set)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(v in os.environ for v in TORCHRUN_VARIABLES)


def free_port() -> int:
    """A TCP port on localhost that is free now (for a single-machine rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def init_from_env(backend: str | None = None, *, timeout: float = 600.0) -> torch.device:
    """Initialise the default process group from torchrun's variables; returns this rank's
    device (``cuda:LOCAL_RANK`` under NCCL, else the CPU). Does nothing but return the device
    if the group already exists.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or None (NCCL when CUDA is available, else gloo).
        timeout: seconds a collective may wait for the other ranks before failing.
    """
    seconds = check_positive("timeout", timeout)
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise ValueError(
            f"init_from_env needs the variables torchrun sets; missing {', '.join(missing)}. "
            "Start the script with `torchrun --nproc-per-node N script.py`"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend='nccl' needs CUDA, but torch.cuda.is_available() is False")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds), **kwargs)
    return device


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (so the launched ranks do not relaunch)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def torchrun_command(
    argv: Sequence[str],
    nproc: int,
    *,
    module: str = "sgdlab.lab.cli",
    nnodes: int = 1,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "sgdlab",
    python: str | None = None,
) -> list[str]:
    """The ``python -m torch.distributed.run ... -m module argv`` command line.

    One node (``nnodes=1``, no endpoint): ``--standalone`` (a local rendezvous on a free
    port). Several nodes: the c10d rendezvous at ``rdzv_endpoint`` (``host:port`` of one of
    the nodes), the same command on every node.
    """
    n = check_count("nproc", nproc)
    nodes = check_count("nnodes", nnodes)
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1 and rdzv_endpoint is None:
        cmd += ["--standalone", "--nnodes=1"]
    else:
        if rdzv_endpoint is None:
            raise ValueError(
                f"nnodes={nodes} needs rdzv_endpoint='host:port' of the rendezvous node"
            )
        cmd += [
            f"--nnodes={nodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
        if node_rank is not None:
            cmd.append(f"--node-rank={int(node_rank)}")
    cmd += [f"--nproc-per-node={n}", "-m", module, *strip_nproc(argv)]
    return cmd


def run_with_torchrun(
    argv: Sequence[str],
    nproc: int,
    *,
    module: str = "sgdlab.lab.cli",
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> int:
    """Run ``module`` with ``argv`` on ``nproc`` processes under torchrun; returns the exit
    code (non-zero when any rank failed: torchrun then stops the others and prints the
    failing rank's error). ``--nproc`` options in ``argv`` are removed. ``timeout``: seconds
    before the whole job (torchrun and its ranks) is killed and ``TimeoutError`` raised.
    Further keyword arguments go to :func:`torchrun_command`.

    Example: ``sgdlab run NAME --nproc 4`` is
    ``run_with_torchrun(["run", "NAME", "--nproc", "4"], 4)``.
    """
    cmd = torchrun_command(argv, nproc, module=module, **kwargs)
    proc_env = dict(os.environ if env is None else env)
    if nproc > 1:
        proc_env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(cmd, env=proc_env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise TimeoutError(
            f"torchrun job did not finish within {timeout} s and was killed: {' '.join(cmd)}"
        ) from None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def _spawned(
    rank: int,
    fn: Callable[..., Any],
    world: int,
    port: int,
    backend: str,
    timeout: float,
    threads: int,
    args: tuple[Any, ...],
) -> None:
    os.environ.update(
        MASTER_ADDR=LOCALHOST,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(threads)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{LOCALHOST}:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears its process group down while a peer still uses it
    finally:
        dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    nproc: int,
    args: tuple[Any, ...] = (),
    *,
    backend: str = "gloo",
    timeout: float = 60.0,
    deadline: float | None = None,
    threads: int | None = None,
    start_method: str = "spawn",
) -> None:
    """Run ``fn(rank, nproc, *args)`` in ``nproc`` new processes joined in a process group.

    Args:
        fn: a module-level function (it is pickled by name into the new processes).
        nproc: number of processes (ranks).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per rank; ``fn`` picks the device).
        timeout: seconds a collective waits for the other ranks before raising.
        deadline: seconds for the whole job; past it every rank is killed and
            ``TimeoutError`` raised (default: none).
        threads: torch threads per process (default: CPU count // nproc, at least 1).
        start_method: ``"spawn"`` (fresh interpreters: ``fn`` must be importable; safe with
            CUDA) or ``"fork"`` (copies of this process: starts in a fraction of the time, as
            nothing is imported again; CPU only, and not after CUDA was initialised here).

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised; carries its traceback.
            The other ranks are terminated.
        torch.multiprocessing.ProcessExitedException: a rank exited with a non-zero code.
        TimeoutError: ``deadline`` passed.
    """
    n = check_count("nproc", nproc)
    seconds = check_positive("timeout", timeout)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if deadline is not None:
        check_positive("deadline", deadline)
    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(
            f"start_method must be 'spawn', 'fork' or 'forkserver', got {start_method!r}"
        )
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // n)
    threads = check_count("threads", threads)
    port = free_port()
    ctx = mp.start_processes(
        _spawned,
        args=(fn, n, port, backend, seconds, threads, tuple(args)),
        nprocs=n,
        join=False,
        start_method=start_method,
    )
    end = None if deadline is None else time.monotonic() + deadline
    while not ctx.join(timeout=0.2):
        if end is not None and time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join()
            raise TimeoutError(f"distributed job did not finish within {deadline} s")
