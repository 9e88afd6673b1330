"""Progress bars for long work (tqdm on a terminal, silent otherwise or when disabled).

Set ``SGDLAB_PROGRESS=0`` to silence them, ``SGDLAB_PROGRESS=1`` to force them on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["bar"]

T = TypeVar("T")


def _disabled() -> bool | None:
    flag = os.environ.get("SGDLAB_PROGRESS")
    if flag == "0":
        return True
    if flag == "1":
        return False
    return None  # tqdm: disable when stderr is not a terminal


def bar(iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm progress bar written to stderr."""
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, disable=_disabled(), leave=False))
