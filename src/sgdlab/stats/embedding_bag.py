"""Rule for ``nn.EmbeddingBag``: one bag per example (rows of a 2-D input, or the bags that
``offsets`` cut a 1-D input into), modes ``"sum"``, ``"mean"`` and ``"max"``,
``per_sample_weights``, ``padding_idx``, ``include_last_offset``.

Bag b's output is ``sum_j c_j W[idx_j]`` over its lookups j (``c_j`` = the per-sample weight, or
1 for ``"sum"``, ``1 / n_b`` for ``"mean"`` with ``n_b`` the bag's lookups other than
``padding_idx``, 0 for ``padding_idx``), so its weight gradient has row v equal to
``sum_{j in b: idx_j = v} c_j d_b``: the lookups of :func:`~sgdlab.stats.embedding.segment_moments`
with gradients ``c_j d_b``. In ``"max"`` mode bag b's output entry k is ``W[m_bk, k]`` with
``m_bk`` the row that attains the maximum (torch's own choice, recomputed with
``torch.embedding_bag``), so the gradient is ``d_bk`` at ``(m_bk, k)`` and zero elsewhere: one
entry per (bag, k), hence ``sum_b G_b^2`` adds ``d_bk^2`` at ``(m_bk, k)``. Empty bags get no
gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._base import Call, Contribution, in_dtype
from ._registry import Rule, register
from .embedding import segment_moments

__all__ = ["embedding_bag_rule", "check_embedding_bag", "embedding_bag_batch_size"]


def _inputs(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None, Tensor | None]:
    names = ("input", "offsets", "per_sample_weights")
    values = list(args) + [None] * (3 - len(args))
    for i, n in enumerate(names):
        if n in kwargs:
            values[i] = kwargs[n]
    return values[0], values[1], values[2]


def check_embedding_bag(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse what couples the examples (``scale_grad_by_freq``); inputs without bags (1-D
    without offsets, other ranks) torch itself refuses before the tracker sees them."""
    if module.scale_grad_by_freq:
        raise ValueError(
            "EmbeddingBag has scale_grad_by_freq=True: its gradient divides by token counts "
            "over the whole batch, so per-example gradients are not defined; construct it with "
            "scale_grad_by_freq=False to track it"
        )


def embedding_bag_batch_size(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """The number of bags."""
    x, offsets, _ = _inputs(args, kwargs)
    if x.dim() == 2:
        return int(x.shape[0])
    return int(offsets.shape[0]) - (1 if module.include_last_offset else 0)


def embedding_bag_rule(call: Call) -> dict[str, Contribution]:
    """Per-example statistics of ``weight`` of one ``nn.EmbeddingBag`` call."""
    module: nn.EmbeddingBag = call.module  # type: ignore[assignment]
    (d,) = call.grads
    if d is None or "weight" not in call.param_names:
        return {}
    x, offsets, psw = _inputs(call.args, call.kwargs)
    weight = module.weight
    d = in_dtype(d, weight.dtype)
    B = call.batch_size
    V = weight.shape[0]
    dev = x.device
    if module.mode == "max":
        return {"weight": _max(call, module, x, offsets, d, B, V)}
    if x.dim() == 2:
        bag = torch.arange(B, device=dev)[:, None].expand(x.shape).reshape(-1)
        idx = x.reshape(-1)
    else:
        bag = (
            torch.searchsorted(
                offsets[:B].contiguous(), torch.arange(x.shape[0], device=dev), right=True
            )
            - 1
        )
        idx = x
    if module.padding_idx is None:
        valid = d.new_ones(idx.shape)
    else:  # lookups of padding_idx: no gradient, and not counted in a mean
        valid = (idx != module.padding_idx).to(d.dtype)
    c = valid if psw is None else valid * in_dtype(psw.detach(), d.dtype).reshape(-1)
    if module.mode == "mean":  # (torch allows per_sample_weights in "sum" mode only)
        counts = d.new_zeros(B).index_add_(0, bag, valid)
        c = c / counts.clamp_min(1)[bag]
    rows = c[:, None] * d[bag]  # the gradient of each lookup
    return {"weight": segment_moments(call, bag, idx, rows, B, V)}


def _max(
    call: Call,
    module: nn.EmbeddingBag,
    x: Tensor,
    offsets: Tensor | None,
    d: Tensor,
    B: int,
    V: int,
) -> Contribution:
    """``"max"`` mode: the gradient ``d_bk`` at the maximising row ``m_bk`` of each entry."""
    last = module.include_last_offset
    if x.dim() == 2:  # bags of equal length, as 1-D input and offsets
        offsets = torch.arange(0, x.numel(), x.shape[1], device=x.device)
        x, last = x.reshape(-1), False
    _, _, bag_size, rows_max = torch.embedding_bag(
        module.weight.detach(), x, offsets, False, 2, False, None, last, module.padding_idx
    )
    dim = d.shape[1]
    live = (bag_size[:B] > 0).to(d.dtype)  # empty bags (or all padding) get no gradient
    g = d * live[:, None]
    flat = rows_max[:B] * dim + torch.arange(dim, device=d.device)  # (row, k) per (bag, k)
    if "weight" in call.materialize:
        per = d.new_zeros(B, V * dim)
        per.scatter_(1, flat, g)
        return Contribution(per_example=per.view(B, V, dim))
    sq = g * g
    moment = d.new_zeros(V * dim).index_add_(0, flat.reshape(-1), sq.reshape(-1), alpha=call.scale)
    return Contribution(moment=moment.view(V, dim), sq_norms=sq.sum(1) if call.norms else None)


register(
    nn.EmbeddingBag,
    Rule(embedding_bag_rule, batch_size=embedding_bag_batch_size, check=check_embedding_bag),
)
