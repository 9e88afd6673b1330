"""sgdlab's optimizers: torch.optim.Optimizer subclasses in the lecture's form.

Each reproduces its torch.optim namesake with default options and adds the batch-size
scaling rules of :mod:`sgdlab.hyper`, the lecture's variants (eps inside the root, division by
sigma^2, per-example second moments, 1/min(t, N) bias correction) and a constructor from the
lecture's conjugate units. Each has three paths proven equal in float64 (parameters and
state): the per-tensor reference (``foreach=False``), torch's multi-tensor kernels
(``foreach=True``) and, opt in with ``fused=True``, flat buffers updated by one compiled kernel
per param group (:mod:`sgdlab.optim._fast`).
"""

from __future__ import annotations

from sgdlab.optim._base import BatchScaledOptimizer, NonFiniteGradientError
from sgdlab.optim.adam import Adam
from sgdlab.optim.rmsprop import RMSProp
from sgdlab.optim.sgd import SGD

__all__ = ["SGD", "RMSProp", "Adam", "BatchScaledOptimizer", "NonFiniteGradientError"]
