"""sgdlab: stochastic gradient descent as in the lecture, made real.

* :class:`SGD`, :class:`RMSProp`, :class:`Adam`: drop-in torch.optim replacements whose
  hyperparameters survive a change of batch size (:mod:`sgdlab.hyper`).
* :mod:`sgdlab.hyper`: conjugate (per-example) units eta', N'_g, N'_s and scaling rules.
* :mod:`sgdlab.averages`: running averages and bias corrections.
* :mod:`sgdlab.schedules`: learning-rate and batch-size schedules.
* :mod:`sgdlab.stats`: the augmented backward (per-example second moments), noise meter.
* :mod:`sgdlab.dynamics`: SGD dynamics, Langevin, stationary laws, exact references.
* :mod:`sgdlab.lab`: ``sgdlab reproduce``, every claim of the lecture measured.
"""

from __future__ import annotations

import importlib
from typing import Any

from sgdlab import averages, hyper
from sgdlab.optim import SGD, Adam, NonFiniteGradientError, RMSProp

__version__ = "0.1.0"

_LAZY = ("schedules", "stats", "dynamics", "lab")

__all__ = [
    "SGD",
    "RMSProp",
    "Adam",
    "NonFiniteGradientError",
    "averages",
    "hyper",
    *_LAZY,
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Subpackages with heavier imports (scipy, matplotlib) load on first use.
    if name in _LAZY:
        module = importlib.import_module(f"sgdlab.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'sgdlab' has no attribute {name!r}")
