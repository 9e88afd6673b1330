"""Figures: matplotlib with the Agg backend, saved as PNG atomically beside the results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import atomic_path  # noqa: E402

__all__ = ["figure", "save"]


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6) -> Any:
    """A new figure and axes grid sized ``width x height`` inches per panel."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


def save(fig: Any, outdir: str | os.PathLike[str], name: str) -> str:
    """Save ``fig`` as ``outdir/name`` (PNG, atomically), close it and return ``name``."""
    path = Path(outdir) / name
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return name
