"""Augmented backward and gradient-noise statistics.

``track(model)`` makes every ``loss.backward()`` also leave, on each trainable parameter ``p``,
``p.grad_second_moment`` = (1/B) sum_b g_b * g_b, the batch mean of squared per-example
gradients that batch-size-invariant RMSProp/Adam need (lecture, "Scaling eta with batch size
for RMSProp"). Exact rules for every layer of ``torch.nn`` with parameters (Linear, Bilinear,
Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding, EmbeddingBag, LayerNorm, GroupNorm, RMSNorm,
InstanceNorm, BatchNorm in eval mode, PReLU, RNN/LSTM/GRU and their cells, MultiheadAttention;
its rarer options hand over to the fallback; Hugging Face's ``Conv1D``), rules you register
for your own layer types (:func:`register_rule` for a closed form, :func:`register` for a
:class:`Rule` with a fast path: docs/extending.md) and a ``torch.func`` fallback for any other
module; BatchNorm in training mode couples the examples and is refused
(:func:`replace_batchnorm` swaps it for GroupNorm). :func:`clip_grad_norm_` clips the gradient
and scales the statistics with it.
:class:`NoiseMeter` turns the same statistics into the gradient noise scale (McCandlish et al.
2018), per-group variances and the SGD temperature.

Example (batch-size-invariant RMSProp with the lecture's per-example second moment)::

    >>> import torch, sgdlab, sgdlab.stats
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    >>> tracker = sgdlab.stats.track(model)            # loss must be the batch mean
    >>> opt = sgdlab.RMSProp(model.parameters(), lr=1e-3, second_moment="per_example")
    >>> meter = sgdlab.stats.NoiseMeter(opt, batch_size=32)
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> opt.zero_grad()
    >>> torch.nn.functional.mse_loss(model(x), y).backward()
    >>> reading = meter.update()                       # B_simple, tr Sigma, temperature
    >>> opt.step()
    >>> tracker.detach()
"""

from __future__ import annotations

# the layer files register their rules (sgdlab.stats.register) as they are imported
from . import (  # noqa: F401
    attention,
    bilinear,
    cell,
    conv,
    conv_transpose,
    embedding,
    embedding_bag,
    fallback,
    linear,
    norm,
    prelu,
    recurrent,
    transposed_linear,
)
from ._base import Call, Contribution
from ._registry import FastPath, Rule, RuleHandle, register, rule_for
from .clip import clip_grad_norm_
from .convert import replace_batchnorm
from .custom import register_rule
from .noise import NoiseMeter, NoiseReading, noise_statistics
from .tracker import ATTRIBUTE, PassSummary, Tracker, track

__all__ = [
    "ATTRIBUTE",
    "Call",
    "Contribution",
    "FastPath",
    "NoiseMeter",
    "NoiseReading",
    "PassSummary",
    "Rule",
    "RuleHandle",
    "Tracker",
    "clip_grad_norm_",
    "noise_statistics",
    "register",
    "register_rule",
    "replace_batchnorm",
    "rule_for",
    "track",
]
