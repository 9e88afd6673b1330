"""A layer and its fast path as a one-file extension (docs/extending.md): ``y = x * weight +
bias`` over the last dimension; example b's gradients ``v_b(weight) = sum_i x_bi d_bi`` and
``v_b(bias) = sum_i d_bi`` (summed over its positions i). Importing the file registers the rule.
``CALLS`` counts the calls the fast path computed."""

from __future__ import annotations

import torch
from torch import nn

from sgdlab.stats import Contribution, FastPath, Rule, register

CALLS: list[nn.Module] = []


class Diagonal(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def _per_example(x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, n = x.shape[0], x.shape[-1]
    return (x * d).reshape(B, -1, n).sum(1), d.reshape(B, -1, n).sum(1)


def diagonal_rule(call):
    """The general path (``v_b`` kept per example for a parameter used several times)."""
    (x,), (d,) = call.args, call.grads
    out = {}
    for name, v in zip(("weight", "bias"), _per_example(x, d), strict=True):
        if name in call.param_names:
            out[name] = (
                Contribution(per_example=v)
                if name in call.materialize
                else Contribution(moment=(v * v).sum(0) * call.scale)
            )
    return out


def diagonal_moments(module, x, d, scale, memory_budget, has_weight, has_bias):
    """The fast path: ``scale * sum_b v_b^2`` of the tracked parameters, in order."""
    CALLS.append(module)
    vw, vb = _per_example(x, d)
    return tuple((v * v).sum(0) * scale for v, keep in ((vw, has_weight), (vb, has_bias)) if keep)


HANDLE = register(
    Diagonal, Rule(diagonal_rule, fast=FastPath(diagonal_moments, more=diagonal_moments))
)
