"""Rule for ``nn.Embedding``.

Example b looks up tokens ``idx_bt``; its weight gradient has row v equal to
``sum_{t: idx_bt = v} d_bt`` (rows of ``padding_idx`` stay zero, as in torch). The rule
aggregates output gradients per (example, token) pair with one ``index_add``, squares the
aggregates and scatters them into the vocabulary rows, so its cost and memory scale with the
number of distinct (example, token) pairs, never with ``B * vocabulary``.

``scale_grad_by_freq=True`` divides by token counts of the whole batch, which couples the
examples; such modules are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import Call, Contribution, in_dtype, require_batched

__all__ = ["embedding_rule", "check_embedding"]


def check_embedding(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse embeddings whose gradient couples the examples of a batch."""
    if module.scale_grad_by_freq:
        raise ValueError(
            f"{type(module).__name__} has scale_grad_by_freq=True: its gradient divides by "
            "token counts over the whole batch, so per-example gradients are not defined; "
            "construct it with scale_grad_by_freq=False to track it"
        )


def embedding_rule(call: Call) -> dict[str, Contribution]:
    """Per-example statistics of ``weight`` of one ``nn.Embedding`` call."""
    module: nn.Embedding = call.module  # type: ignore[assignment]
    (d,) = call.grads
    if d is None or "weight" not in call.param_names:
        return {}
    idx = call.args[0]
    d = in_dtype(d, module.weight.dtype)
    require_batched(module, idx, 1, "indices [B, ...]")
    B = call.batch_size
    V, dim = module.weight.shape
    idx = idx.reshape(B, -1)
    d = d.reshape(B, -1, dim)
    example = torch.arange(B, device=idx.device)[:, None].expand_as(idx)
    keep = torch.ones_like(idx, dtype=torch.bool)
    if module.padding_idx is not None:
        keep = idx != module.padding_idx
    keys = (example * V + idx)[keep]
    rows = d[keep]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    agg = rows.new_zeros(uniq.shape[0], dim).index_add_(0, inverse, rows)
    if "weight" in call.materialize:
        per = d.new_zeros(B, V, dim)
        per.view(B * V, dim).index_add_(0, uniq, agg)
        return {"weight": Contribution(per_example=per)}
    sq = agg * agg
    moment = d.new_zeros(V, dim).index_add_(0, uniq % V, sq, alpha=call.scale)
    norms = None
    if call.norms:
        norms = d.new_zeros(B).index_add_(0, torch.div(uniq, V, rounding_mode="floor"), sq.sum(1))
    return {"weight": Contribution(moment=moment, sq_norms=norms)}
