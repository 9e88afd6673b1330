"""Figures: matplotlib with the Agg backend, saved as PNG atomically beside the results.

Every figure fits the report's page: at most :data:`MAX_WIDTH_IN` inches wide, saved at
:data:`DPI` (at most 960 pixels wide, sharp in print), panels in rows of at most two, each
panel lettered (a), (b), ... in reading order (captions refer to the letters), legends below
their panel, never over the data.

The data drawn is also kept as numbers (the ``curves`` of a results.json):
:func:`curves_of` draws an experiment's figures without saving them and reads every labelled
line, marker series and error bar back from the axes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    AutoLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
)

from .atomic import atomic_path, from_jsonable, to_jsonable  # noqa: E402

__all__ = ["DPI", "MAX_COLS", "MAX_WIDTH_IN", "curves_of", "figure", "log_limits", "save"]

DPI = 150
MAX_WIDTH_IN = 6.4
MAX_COLS = 2
_STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
}
matplotlib.rcParams.update(_STYLE)  # sizes are read when an artist is made: set them for all
_capture: list[dict[str, Any]] | None = None


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6) -> Any:
    """A new figure with ``ncols * nrows`` panels and its axes, indexed ``ax[0, k]`` for panel
    ``k`` in reading order.

    The panels are laid out in rows of at most :data:`MAX_COLS`; the figure is
    :data:`MAX_WIDTH_IN` wide (``width`` for a single panel, if narrower) and each panel keeps
    the aspect ``width : height``. An odd last panel is centred-left; unused cells are hidden.
    """
    n = ncols * nrows
    if n < 1:
        raise ValueError(f"a figure needs at least one panel, got ncols={ncols}, nrows={nrows}")
    cols = min(n, MAX_COLS)
    rows = math.ceil(n / cols)
    fig_w = min(MAX_WIDTH_IN, width * cols)
    panel_h = max(2.4, height * (fig_w / cols) / width)
    fig, grid = plt.subplots(
        rows,
        cols,
        figsize=(fig_w, panel_h * rows + 0.5 * rows),
        squeeze=False,
        layout="constrained",
    )
    flat = list(grid.ravel())
    for a in flat[n:]:
        a.set_visible(False)
    axes = np.empty((1, n), dtype=object)
    for k in range(n):
        axes[0, k] = flat[k]
    return fig, axes


def log_limits(a: Any, values: Any, axis: str = "y", pad: float = 1.5) -> None:
    """Limit a log axis to the positive finite ``values`` (a curve that underflows to 1e-300, or
    reaches 0, must not set the axis), widened by the factor ``pad``."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    if v.size:
        lo, hi = float(v.min()) / pad, float(v.max()) * pad
        (a.set_ylim if axis == "y" else a.set_xlim)(lo, hi)


def _tidy_log_axis(axis: Any) -> None:
    """Plain tick labels on a log axis, never crowded: matplotlib labels the minor ticks of a
    short log axis (2x10^1 3x10^1 ...), which overlap; label 1, 2, 5 per decade on an axis of
    under two decades, each decade up to six, and leave longer ones to matplotlib."""
    lo, hi = sorted(axis.get_view_interval())
    if not (lo > 0 and math.isfinite(hi)):
        return
    decades = math.log10(hi / lo)
    if decades > 6:
        axis.set_minor_formatter(NullFormatter())
        return
    subs = (1.0, 2.0, 5.0) if decades < 2 else (1.0,)
    if decades < 0.6:  # 1, 2, 5 may leave a single label: every integer multiple instead
        subs = tuple(float(k) for k in range(1, 10))
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.6g}"))
    axis.set_minor_formatter(NullFormatter())


def _legend_cols(labels: list[str], panels_per_row: int) -> int:
    """Legend columns that fit under a panel: long labels one per line."""
    longest = max((len(t) for t in labels), default=0)
    width = 3 if panels_per_row == 1 else 2
    return 1 if longest * width > 60 else width


def _finish(fig: Any) -> list[Any]:
    """Letter the visible panels (a), (b), ..., tidy their log axes and move their legends
    below them."""
    axes = [a for a in fig.axes if a.get_visible() and a.get_label() != "<colorbar>"]
    many = len(axes) > 1
    for k, a in enumerate(axes):
        for axis, scale in ((a.xaxis, a.get_xscale()), (a.yaxis, a.get_yscale())):
            if scale == "log":
                _tidy_log_axis(axis)
            elif isinstance(axis.get_major_locator(), AutoLocator):
                axis.set_major_locator(MaxNLocator(nbins=5))  # 5-digit labels must not touch
        if many and k < 26:
            a.set_title(f"({string.ascii_lowercase[k]}) {a.get_title()}".rstrip())
        leg = a.get_legend()
        spec = a.get_subplotspec()
        cols = spec.get_gridspec().ncols if spec is not None else 1
        if leg is not None:
            handles, labels = a.get_legend_handles_labels()
            a.legend(
                handles,
                labels,
                loc="upper center",
                bbox_to_anchor=(0.5, -0.18),
                ncol=min(_legend_cols(labels, cols), max(1, len(labels))),
                fontsize=6.5,
                frameon=False,
            )
    return axes


def save(fig: Any, outdir: str | os.PathLike[str], name: str) -> str:
    """Save ``fig`` as ``outdir/name`` (PNG at :data:`DPI`, atomically), close it and return
    ``name``. Under :func:`curves_of` the figure's data is read back instead of saved."""
    axes = _finish(fig)
    if _capture is not None:
        _capture.append({"name": Path(name).stem, "axes": [_axes_curves(a) for a in axes]})
        plt.close(fig)
        return name
    path = Path(outdir) / name
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return name


def _numbers(v: Any) -> list[float | None]:
    out = []
    for x in np.ma.filled(np.ma.asarray(v, dtype=float), np.nan).ravel():
        out.append(float(x) if math.isfinite(x) else None)
    return out


def _axes_curves(a: Any) -> dict[str, Any]:
    """``{"x_label", "y_label", "series": {label: {"x", "y", "yerr"}}}`` of one panel."""
    series: dict[str, Any] = {}
    yerr: dict[int, list[float | None]] = {}
    for c in a.containers:
        if isinstance(c, ErrorbarContainer) and c.lines[0] is not None and c.lines[2]:
            segs = c.lines[2][-1].get_segments()
            yerr[id(c.lines[0])] = [
                float(abs(s[1][1] - s[0][1]) / 2) if len(s) == 2 and np.isfinite(s).all() else None
                for s in segs
            ]
    for k, c in enumerate(a.containers):
        if isinstance(c, BarContainer) and len(c.patches):
            label = str(c.get_label())
            label = f"bars {k + 1}" if label.startswith("_") else label
            x = [p.get_x() + p.get_width() / 2 for p in c.patches]
            series[label] = {
                "x": _numbers(x),
                "y": _numbers([p.get_height() for p in c.patches]),
                "yerr": None,
            }
    for k, line in enumerate(a.get_lines()):
        label = str(line.get_label())
        if label.startswith("_"):  # matplotlib's unlabelled lines: name them by order
            label = f"line {k + 1}"
        x, y = _numbers(line.get_xdata()), _numbers(line.get_ydata())
        e = yerr.get(id(line))
        series[label] = {"x": x, "y": y, "yerr": e if e is not None and len(e) == len(y) else None}
    for k, coll in enumerate(a.collections):
        if not isinstance(coll, PathCollection) or len(coll.get_offsets()) == 0:
            continue  # scatter markers only (not bands or bars)
        label = str(coll.get_label())
        if label.startswith("_"):
            label = f"points {k + 1}"
        offs = np.asarray(coll.get_offsets())
        series.setdefault(
            label, {"x": _numbers(offs[:, 0]), "y": _numbers(offs[:, 1]), "yerr": None}
        )
    return {
        "title": a.get_title(),
        "x_label": a.get_xlabel(),
        "y_label": a.get_ylabel(),
        "series": series,
    }


@contextlib.contextmanager
def _capturing() -> Iterator[list[dict[str, Any]]]:
    global _capture
    before, _capture = _capture, []
    try:
        yield _capture
    finally:
        _capture = before


def curves_of(plot: Callable[[Any, Path], list[str]], results: Any) -> dict[str, Any]:
    """The data of every panel ``plot`` draws from ``results`` (as saved: JSON round trip),
    ``{"<figure>_<panel letter>": {"x_label", "y_label", "series": {label: {x, y, yerr}}}}``,
    ``yerr`` a list of half-widths or ``None``. Nothing is written."""
    saved = from_jsonable(json.loads(json.dumps(to_jsonable(results))))
    with _capturing() as figs:
        plot(saved, Path(os.devnull))
    curves: dict[str, Any] = {}
    for f in figs:
        for k, ax in enumerate(f["axes"]):
            key = f["name"] if len(f["axes"]) == 1 else f"{f['name']}_{string.ascii_lowercase[k]}"
            curves[key] = {
                "title": ax["title"],
                "x_label": ax["x_label"],
                "y_label": ax["y_label"],
                "series": ax["series"],
            }
    return curves
