"""Helpers shared by the experiments: chain statistics and the real data sets."""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path

__all__ = [
    "chain_mean",
    "digits",
    "fit_loglog_slope",
    "mnist1d",
    "ratio_stderr",
    "seed_mean",
    "with_curves",
]


def chain_mean(per_chain: np.ndarray) -> tuple[float, float]:
    """Mean over independent chains and its standard error (spread across chains)."""
    x = np.asarray(per_chain, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"need at least 2 chains for a standard error, got {x.size}")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def seed_mean(per_seed: Any) -> tuple[float, float]:
    """Mean over independent seeds and its standard error; ``(x, nan)`` for a single seed."""
    x = np.asarray(per_seed, dtype=np.float64).ravel()
    if x.size == 1:
        return float(x[0]), math.nan
    return chain_mean(x)


def with_curves(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Decorate an experiment's ``run``: its measurements gain ``curves``, the numbers of every
    panel its module's ``plot`` draws (:func:`sgdlab.lab.plotting.curves_of`), and ``dropped``
    (the points left out of a fit or a figure, with why; ``[]`` unless ``run`` set it)."""

    @functools.wraps(run)
    def wrapped(*args: Any, **kwargs: Any) -> dict[str, Any]:
        from ..plotting import curves_of

        results = run(*args, **kwargs)
        results.setdefault("dropped", [])
        results["curves"] = curves_of(sys.modules[run.__module__].plot, results)
        return results

    return wrapped


def ratio_stderr(a: float, sa: float, b: float, sb: float) -> tuple[float, float]:
    """``a/b`` and its delta-method standard error for independent ``a``, ``b``."""
    r = a / b
    return r, abs(r) * math.sqrt((sa / a) ** 2 + (sb / b) ** 2)


def fit_loglog_slope(x: Any, y: Any) -> tuple[float, float]:
    """Least-squares slope of log y against log x and its standard error."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    a = np.vstack([lx, np.ones_like(lx)]).T
    coef, *_ = np.linalg.lstsq(a, ly, rcond=None)
    n = lx.size
    if n <= 2:
        return float(coef[0]), 0.0
    resid = ly - a @ coef
    s2 = float(resid @ resid) / (n - 2)
    cov = s2 * np.linalg.inv(a.T @ a)
    return float(coef[0]), float(math.sqrt(cov[0, 0]))


def _data_dir(outdir: str | os.PathLike[str]) -> Path:
    d = Path(outdir).parent / "_data"
    d.mkdir(parents=True, exist_ok=True)
    return d


def mnist1d(
    outdir: str | os.PathLike[str], num_samples: int = 5000, seed: int = 42
) -> dict[str, np.ndarray]:
    """MNIST-1D generated locally by the ``mnist1d`` package, cached in the results directory.

    Returns float32 ``x`` (n, 40), int64 ``y`` and the test split ``x_test``, ``y_test``.
    Generation is deterministic in ``seed``; nothing is downloaded.
    """
    path = _data_dir(outdir) / f"mnist1d_n{num_samples}_s{seed}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    d = make_dataset(args)
    arrays = {
        "x": d["x"].astype(np.float32),
        "y": d["y"].astype(np.int64),
        "x_test": d["x_test"].astype(np.float32),
        "y_test": d["y_test"].astype(np.int64),
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return arrays


def digits(standardize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 x 64), features standardised."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float64)
    if standardize:
        sd = x.std(0)
        x = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
    return x, d.target.astype(np.int64)
