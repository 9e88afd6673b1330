"""Augmented backward and gradient-noise statistics.

``track(model)`` makes every ``loss.backward()`` also leave, on each trainable parameter ``p``,
``p.grad_second_moment`` = (1/B) sum_b g_b * g_b, the batch mean of squared per-example
gradients that batch-size-invariant RMSProp/Adam need (lecture, "Scaling eta with batch size
for RMSProp"). Exact rules per layer type (Linear, Conv1d/2d/3d, Embedding, LayerNorm,
GroupNorm, RMSNorm, BatchNorm in eval mode, RNN/LSTM/GRU) and a ``torch.func`` fallback for any
other module. :class:`NoiseMeter` turns the same statistics into the gradient noise scale
(McCandlish et al. 2018), per-group variances and the SGD temperature.
"""

from __future__ import annotations

from .noise import NoiseMeter, NoiseReading, noise_statistics
from .tracker import Tracker, track

__all__ = ["NoiseMeter", "NoiseReading", "Tracker", "noise_statistics", "track"]
