"""SGD dynamics: problems with per-example structure, vectorised chain simulators (SGD with
momentum and preconditioning, Langevin SDE), gradient flow, exact references and estimators.

Conventions: chains are the leading dimension (states ``(R, d)``), float64 by default, the
batch gradient is the *mean* over the batch, ``eta`` is the per-step learning rate (a float or
a schedule ``t -> eta_t``), "time" is the sum of learning rates, and stochastic claims are
checked by time-averaging each chain and taking standard errors across chains.

Example::

    >>> from sgdlab.dynamics import Quadratic, simulate_sgd, excess_loss, estimate_mean
    >>> p = Quadratic(hessian=[1.0, 0.25], noise_covariance=[1.0, 0.5])
    >>> r = simulate_sgd(p, lr=0.2, batch_size=2, steps=3000, chains=400, seed=1)
    >>> m, se = estimate_mean(r.excess_loss)
    >>> abs(m - excess_loss(p.hessian, p.noise_covariance, 0.2, 2)) < 4 * se
    True
"""

from __future__ import annotations

from .closed_forms import (
    batch_gradient_variance,
    coordinate_temperatures,
    heavy_ball_variance,
    least_squares_excess_loss,
    lr_drop_second_moment,
    quadratic_excess_loss,
    quadratic_variance,
)
from .estimators import (
    estimate_excess_from_fdr,
    estimate_mean,
    fit_excess_slope,
    ks_distance,
    z_score,
)
from .flow import convergence_order, flow_errors, gradient_flow
from .gibbs import GibbsDensity, estimate_gibbs_alpha, langevin_stationary_density
from .langevin import first_passage_times, simulate_langevin
from .lyapunov import (
    excess_loss,
    excess_loss_slope,
    momentum_stationary_covariance,
    ou_covariance,
    stationary_covariance,
)
from .mfpt import mean_first_passage_time
from .preconditioning import RMSPropPreconditioner
from .problems import (
    DoubleWell,
    GaussianLeastSquares,
    LogisticRegression,
    MeanEstimation,
    Problem,
    Quadratic,
    Quartic,
    Separable,
)
from .reshuffling import reshuffling_covariances, reshuffling_excess_loss
from .result import ChainResult
from .sgd import simulate_sgd
from .stationarity import FluctuationDissipationTest
from .temperature import estimate_temperatures

__all__ = [
    "ChainResult",
    "DoubleWell",
    "FluctuationDissipationTest",
    "GaussianLeastSquares",
    "GibbsDensity",
    "LogisticRegression",
    "MeanEstimation",
    "Problem",
    "Quadratic",
    "Quartic",
    "RMSPropPreconditioner",
    "Separable",
    "batch_gradient_variance",
    "convergence_order",
    "coordinate_temperatures",
    "estimate_excess_from_fdr",
    "estimate_gibbs_alpha",
    "estimate_mean",
    "estimate_temperatures",
    "excess_loss",
    "excess_loss_slope",
    "first_passage_times",
    "fit_excess_slope",
    "flow_errors",
    "gradient_flow",
    "heavy_ball_variance",
    "ks_distance",
    "langevin_stationary_density",
    "least_squares_excess_loss",
    "lr_drop_second_moment",
    "mean_first_passage_time",
    "momentum_stationary_covariance",
    "ou_covariance",
    "quadratic_excess_loss",
    "quadratic_variance",
    "reshuffling_covariances",
    "reshuffling_excess_loss",
    "simulate_langevin",
    "simulate_sgd",
    "stationary_covariance",
    "z_score",
]
