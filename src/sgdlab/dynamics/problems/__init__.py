"""Problems with per-example structure: loss, full gradient, per-example gradients and, where
they exist, the Hessian H and gradient covariance C at the optimum, the optimum and L*."""

from __future__ import annotations

from .base import Problem
from .least_squares import GaussianLeastSquares
from .logistic import LogisticRegression
from .mean_estimation import MeanEstimation
from .potentials import DoubleWell, Quartic, Separable
from .quadratic import Quadratic

__all__ = [
    "DoubleWell",
    "GaussianLeastSquares",
    "LogisticRegression",
    "MeanEstimation",
    "Problem",
    "Quadratic",
    "Quartic",
    "Separable",
]
