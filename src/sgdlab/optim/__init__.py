"""sgdlab's optimizers: torch.optim.Optimizer subclasses in the lecture's form.

Each reproduces its torch.optim namesake with default options and adds the batch-size
scaling rules of :mod:`sgdlab.hyper`, the lecture's variants (eps inside the root, division by
sigma^2, per-example second moments, 1/min(t, N) bias correction) and a constructor from the
lecture's conjugate units. Each has a per-tensor reference path and a foreach path, proven
equal in float64.
"""

from __future__ import annotations

from sgdlab.optim._base import BatchScaledOptimizer, NonFiniteGradientError
from sgdlab.optim.adam import Adam
from sgdlab.optim.rmsprop import RMSProp
from sgdlab.optim.sgd import SGD

__all__ = ["SGD", "RMSProp", "Adam", "BatchScaledOptimizer", "NonFiniteGradientError"]
