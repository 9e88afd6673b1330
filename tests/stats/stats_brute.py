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


def same_graph_grads(losses: Tensor, params: list[Tensor]) -> list[Tensor]:
    """``[B, *p.shape]`` per parameter: the gradient of each entry of ``losses`` (``[B]``)
    through the one batched graph, so with the random masks the batch drew (``None``, an
    unused parameter: zeros)."""
    rows = []
    for b in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[b], params, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)])
    return [torch.stack(r) for r in zip(*rows, strict=True)]


def assert_statistics(
    model: nn.Module, per: list[Tensor], tracker=None, tol: float = 1e-10, unused_ok: bool = False
) -> None:
    """Each trainable parameter's ``grad_second_moment`` against ``mean_b g_b^2`` of its
    per-example gradients ``per`` (in ``model.parameters()`` order), and, given the tracker,
    its per-example squared norms against ``sum_p |g_b|^2``. With ``unused_ok`` a parameter
    without a statistic must have zero per-example gradients."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for (name, p), g in zip(trainable, per, strict=True):
        got = getattr(p, "grad_second_moment", None)
        if got is None and unused_ok:
            assert not g.any(), name
            continue
        assert rel_err(got, (g * g).mean(0)) < tol, name
    if tracker is not None:
        expected = sum(g.pow(2).flatten(1).sum(1) for g in per)
        assert rel_err(tracker.per_example_sq_norms(), expected) < tol
