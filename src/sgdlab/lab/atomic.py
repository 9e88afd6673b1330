"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Each write goes to a temporary file in the destination directory (``.tmp-PID-`` prefix, PID
the writer's process id), is flushed and ``fsync``-ed, then moved over the destination with
:func:`os.replace`, which is atomic on POSIX file systems. On an exception the temporary file is
removed; after a hard kill a stale temporary may remain, and :func:`remove_stale_temporaries`
deletes it on the next run (only those whose writer is gone: another live process's in-flight
temporary is kept).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TMP_PREFIX",
    "WriteError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "from_jsonable",
    "pid_alive",
    "read_json",
    "remove_stale_temporaries",
    "temporary_owner",
    "to_jsonable",
]

TMP_PREFIX = ".tmp-"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class WriteError(OSError):
    """``path`` could not be written (disk full, read-only file system, ...); whatever was
    there before is unchanged."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(reason)
        self.path, self.reason = os.fspath(path), reason

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:  # raised in a --jobs worker, re-raised here
        return (type(self), (self.path, self.reason))

    @classmethod
    def of(cls, path: str | os.PathLike[str], exc: OSError) -> WriteError:
        return exc if isinstance(exc, WriteError) else cls(path, exc.strerror or str(exc))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The caller writes the temporary (e.g. ``fig.savefig(tmp)``); the file is fsync-ed and
    moved into place when the block exits without an exception, and deleted otherwise. An
    ``OSError`` while writing is raised as :class:`WriteError` naming ``path``.
    """
    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f"{TMP_PREFIX}{os.getpid()}-{dest.name}.", suffix=dest.suffix, dir=dest.parent
        )
    except OSError as exc:
        raise WriteError.of(dest, exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:
        raise WriteError.of(dest, exc) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and paths to plain JSON types.

    Non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"`` so the file stays
    valid JSON (a browser can parse it) while the value stays visible.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating | float):
        x = float(obj)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=1, sort_keys=False) + "\n")


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def from_jsonable(obj: Any) -> Any:
    """Inverse of :func:`to_jsonable` for the non-finite markers: ``"nan"``, ``"inf"`` and
    ``"-inf"`` become floats again (everything else is returned as is)."""
    if isinstance(obj, dict):
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if isinstance(obj, str) and obj in _NONFINITE:
        return _NONFINITE[obj]
    return obj


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`atomic_write_json` (non-finite markers restored)."""
    with open(path, encoding="utf-8") as fh:
        return from_jsonable(json.load(fh))


def temporary_owner(name: str) -> int | None:
    """The process id in a temporary's name ``.tmp-PID-...``; None when it has none."""
    head = name[len(TMP_PREFIX) :].split("-", 1)[0]
    return int(head) if name.startswith(TMP_PREFIX) and head.isdigit() else None


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists (a zombie counts as alive until reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries (files or staging directories) left in ``directory`` by a killed
    writer, those whose process is gone or whose name carries no process id; return them."""
    d = Path(directory)
    removed = []
    if d.is_dir():
        for p in d.iterdir():
            if not p.name.startswith(TMP_PREFIX):
                continue
            owner = temporary_owner(p.name)
            if owner is not None and pid_alive(owner):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
