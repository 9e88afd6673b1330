"""Rule for ``nn.Linear``: exact per-example second moments.

Input ``a`` of shape ``[B, in]`` and output gradient ``d`` of shape ``[B, out]``: example b's
weight gradient is the outer product ``d_b a_b^T``, so

    sum_b (d_b a_b^T)^2 = (d * d)^T (a * a)        (entrywise squares; one extra matmul)

and ``||d_b a_b^T||^2 = ||d_b||^2 ||a_b||^2``. No per-example tensor is formed.

Input ``[B, T..., in]`` (a linear map applied at many positions: sequences, attention
projections, transformer MLPs): example b's gradient is ``D_b^T A_b = sum_t d_bt a_bt^T``, a sum
over positions *before* squaring. Squaring per position (``sum_t (d_bt)^2 (a_bt)^2``) is wrong
whenever positions are correlated, so the per-example gradient is materialised with one batched
matmul per chunk of examples under the tracker's memory budget (:func:`linear_seq_moments` when
one chunk holds the whole batch).

Reference: Goodfellow (2015) "Efficient per-example gradient computations"; Dangel, Kunstner &
Hennig (2020) "BackPACK", SumGradSquared.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _fused_linear as fused
from ._base import (
    Call,
    Contribution,
    in_dtype,
    in_param_dtype,
    reduce_per_example,
    require_batched,
    scaled_ones,
    small_per_example,
    square_sum,
    unread,
)
from ._registry import FastPath, Rule, register

__all__ = ["affine_moments", "linear_rule", "linear_moments", "linear_seq_moments"]


def linear_rule(call: Call) -> dict[str, Contribution]:
    """Per-example statistics of ``weight`` and ``bias`` of one ``nn.Linear`` call."""
    module: nn.Linear = call.module  # type: ignore[assignment]
    (d,) = call.grads
    if d is None:
        return {}
    dtype = module.weight.dtype
    a = call.args[0]
    if a.dtype != dtype:
        a = in_dtype(a, dtype)
    if d.dtype != dtype:
        d = in_dtype(d, dtype)
    names = call.param_names
    out: dict[str, Contribution] = {}
    if a.dim() == 2:
        return affine_moments(
            call, d, a, "weight" if "weight" in names else None, "bias" if "bias" in names else None
        )
    require_batched(module, a, 2, "inputs [B, in] or [B, T, ..., in]")
    B = call.batch_size
    a3 = a.reshape(B, -1, a.shape[-1])
    d3 = d.reshape(B, -1, d.shape[-1])
    if "weight" in call.materialize:  # shared: G_b = D_b^T A_b summed with the other uses
        out["weight"] = Contribution(factors=(d3, a3))
    elif "weight" in names:
        out["weight"] = reduce_per_example(
            "weight",
            call,
            module.weight.shape,
            d3,
            lambda s: torch.bmm(d3[s].transpose(1, 2), a3[s]),
        )
    if "bias" in names:
        out["bias"] = small_per_example("bias", call, d3.sum(1))
    return out


def affine_moments(
    call: Call, d: torch.Tensor, a: torch.Tensor, weight: str | None, bias: str | None
) -> dict[str, Contribution]:
    """Statistics of an affine map ``z = W a + b`` applied once per example (``a`` ``[B, in]``,
    output gradient ``d`` ``[B, out]``; parameter names ``weight``, ``bias``, ``None`` for one
    not tracked): example b's gradients are ``d_b a_b^T`` and ``d_b``, so ``scale * (d*d)^T
    (a*a)`` (one matrix product) and ``scale * sum_b d_b^2``, with norms ``||d_b||^2 ||a_b||^2``
    and ``||d_b||^2``; a parameter used several times hands over its factors ``(d, a)`` (the
    weight) or per-example gradients (the bias). ``nn.Linear`` on ``[B, in]`` and the two maps
    of a recurrent cell (:mod:`sgdlab.stats.cell`)."""
    out: dict[str, Contribution] = {}
    d2 = None
    if weight is not None:
        if weight in call.materialize:
            out[weight] = Contribution(factors=(d, a))
        else:
            d2 = d * d
            a2 = a * a
            norms = d2.sum(1) * a2.sum(1) if call.norms else None
            # scale * d2^T a2 in one kernel (beta=0: the first argument is not read)
            moment = torch.addmm(unread(d2), d2.T, a2, beta=0, alpha=call.scale)
            out[weight] = Contribution(moment, None, norms)
    if bias is not None:
        if bias in call.materialize:
            out[bias] = small_per_example(bias, call, d)
        else:
            d2 = d * d if d2 is None else d2
            # scale * sum_b d_b^2 as one matrix-vector product
            moment = torch.mv(d2.T, scaled_ones(d2.shape[0], call.scale, d2))
            out[bias] = Contribution(moment, None, d2.sum(1) if call.norms else None)
    return out


def linear_moments(
    calls: list[tuple[bool, bool, torch.dtype, torch.Tensor, torch.Tensor]], scale: float
) -> list[tuple[torch.Tensor, ...]]:
    """The ``[B, in]`` case of :func:`linear_rule` for several calls at once.

    Each call is ``(weight, bias, dtype, a, d)``: which parameters to compute, their dtype, the
    input and the output gradient. Returns, per call, ``scale * (d*d)^T (a*a)`` for the weight
    and ``scale * sum_b d_b^2`` for the bias (those requested, in this order). All entrywise
    squares are one multi-tensor operation, so a stack of small layers pays one kernel for them
    instead of two per layer: what matters when a step is bound by kernel launches rather than
    arithmetic. On a GPU with Triton, fp32 calls of one batch size go to one fused kernel for
    all layers (:mod:`sgdlab.stats._fused_linear`).
    """
    first = calls[0][4]
    if all(
        w
        and a.shape[0] == first.shape[0]
        and d.device == first.device
        and fused.available(d, dtype)
        for w, _, dtype, a, d in calls
    ):
        try:
            return fused.fused_linear_moments([(b, a, d) for _, b, _, a, d in calls], scale)
        except Exception as e:  # a Triton that cannot compile or launch here: torch path
            fused.disable(e)
    tensors: list[torch.Tensor] = []
    for weight, _, dtype, a, d in calls:
        if weight:
            tensors.append(a if a.dtype is dtype else in_dtype(a, dtype))
        tensors.append(d if d.dtype is dtype else in_dtype(d, dtype))
    squares = torch._foreach_mul(tensors, tensors)
    out: list[tuple[torch.Tensor, ...]] = []
    i = 0
    consts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per (batch, dtype, device)
    for weight, bias, _, _, _ in calls:
        d2 = squares[i + weight]
        d2t = d2.T
        key = (d2.shape[0], d2.dtype, d2.get_device())
        c = consts.get(key)
        if c is None:
            c = consts[key] = (unread(d2), scaled_ones(key[0], scale, d2))
        if weight:
            w = torch.addmm(c[0], d2t, squares[i], beta=0, alpha=scale)
            i += 2
            out.append((w, torch.mv(d2t, c[1])) if bias else (w,))
        else:
            i += 1
            out.append((torch.mv(d2t, c[1]),))
    return out


def linear_seq_moments(
    module: nn.Module,
    x: torch.Tensor,
    d: torch.Tensor,
    scale: float,
    memory_budget: int,
    weight: bool,
    bias: bool,
) -> tuple[torch.Tensor, ...] | None:
    """The ``[B, T..., in]`` case of :func:`linear_rule` with little host work: ``scale *
    sum_b (D_b^T A_b)^2`` for the weight (one batched matmul, an in-place square and one
    matrix-vector product) and ``scale * sum_b (sum_t d_bt)^2`` for the bias (those requested,
    in this order). Returns ``None`` where the general rule is needed: per-example weight
    gradients that do not fit ``memory_budget`` in one chunk. Same kernels and results as
    :func:`linear_rule`.
    """
    x, d = in_param_dtype(module, x, d)
    B = x.shape[0]  # d may come flattened, [B * T, out] (the tracker's view source)
    w = module.weight
    if weight and B * w.numel() * d.element_size() > memory_budget:
        return None  # chunks: the general rule
    d3 = d.reshape(B, -1, d.shape[-1])
    out: list[torch.Tensor] = []
    if weight:
        g = torch.bmm(d3.transpose(1, 2), x.reshape(B, -1, x.shape[-1])).view(B, -1)
        out.append(square_sum(g, scale).view(w.shape))
    if bias:
        out.append(square_sum(d3.sum(1), scale))
    return tuple(out)


# 2-D calls wait for the end of the pass and are computed together (the Linear lane), calls on
# [B, T..., in] take linear_seq_moments (the gradient of the product before its reshape)
register(
    nn.Linear,
    Rule(linear_rule, fast=FastPath(lane=linear_moments, more=linear_seq_moments, flat_grad=True)),
)
