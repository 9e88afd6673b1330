"""sgdlab: stochastic gradient descent as in the lecture, made real.

Optimizers whose hyperparameters survive a change of batch size, the hyperparameter algebra
(per-example learning rate eta', horizons N'_g and N'_s counted in examples), running
averages, learning-rate schedules, per-example second moments, SGD dynamics and the lab.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
