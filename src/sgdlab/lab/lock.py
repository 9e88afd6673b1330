"""One run at a time per results directory.

A run (``run``, ``reproduce``, ``report``) holds an exclusive :func:`fcntl.flock` on
``DIR/.sgdlab.lock``, which records the holder's process id. A second run on the same directory
does not wait: it fails at once with :class:`DirectoryBusyError` (``sgdlab: error``, exit 2)
naming that process. The kernel releases the lock when the holder exits, even on ``kill -9``, so
a lock is never stale. The lock is re-entrant within a process (``run`` then ``report``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .atomic import WriteError
from .config import ConfigError

__all__ = ["LOCK_NAME", "DirectoryBusyError", "output_lock"]

LOCK_NAME = ".sgdlab.lock"

_held: dict[str, int] = {}  # directories this process holds, with the nesting depth


class DirectoryBusyError(ConfigError):
    """Another process holds the results directory's lock."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of results directory ``out`` (made if missing) for the block."""
    d = Path(out)
    key = str(d.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise WriteError.of(d / LOCK_NAME, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryBusyError(
                f"{os.fspath(out)!r} is in use by another sgdlab run (pid {_holder(fd)}); "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # releases the lock
