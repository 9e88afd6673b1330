"""Brute-force oracle: per-example gradients by one autograd call per example (float64)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def per_example_grads(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    batch_dim: int = 0,
) -> list[Tensor]:
    """``[B, *p.shape]`` per trainable parameter: gradient of example b's loss ``l_b``.

    ``loss_fn(out, y)`` must return the per-example losses summed over the examples it is given.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for b in range(x.shape[batch_dim]):
        xb = x.narrow(batch_dim, b, 1)
        yb = y.narrow(batch_dim if y.dim() > batch_dim else 0, b, 1) if y is not None else None
        gs = torch.autograd.grad(loss_fn(model(xb), yb), params, allow_unused=True)
        rows.append([g if g is not None else torch.zeros_like(p) for g, p in zip(gs, params)])
    return [torch.stack([r[i] for r in rows]) for i in range(len(params))]


def rel_err(a: Tensor, b: Tensor) -> float:
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale)
