"""Rule for ``nn.Embedding``.

Example b looks up tokens ``idx_bt``; its weight gradient has row v equal to
``sum_{t: idx_bt = v} d_bt`` (rows of ``padding_idx`` stay zero, as in torch). The rule sorts
the (example, token) keys, sums the output gradients of each run of equal keys with one
``index_add``, squares the sums and scatters them into the vocabulary rows, so its cost and
memory scale with the number of lookups ``B * T``, never with ``B * vocabulary``; every shape
is known in advance, so on a GPU it never waits for the device (no ``unique``, no boolean
indexing).

``scale_grad_by_freq=True`` divides by token counts of the whole batch, which couples the
examples; such modules are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._base import Call, Contribution, in_dtype, require_batched, row_moments, row_sums
from ._registry import Rule, register

__all__ = ["embedding_rule", "check_embedding", "segment_moments"]


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
    rows = d.reshape(-1, dim)  # one per (example, position)
    if module.padding_idx is not None:  # rows of padding_idx get no gradient
        rows = rows * (idx != module.padding_idx).reshape(-1, 1).to(rows.dtype)
    return {
        "weight": segment_moments(
            call,
            torch.arange(B, device=idx.device)[:, None].expand(B, idx.shape[1]).reshape(-1),
            idx.reshape(-1),
            rows,
            B,
            V,
        )
    }


def segment_moments(
    call: Call, example: Tensor, idx: Tensor, rows: Tensor, B: int, V: int
) -> Contribution:
    """The statistics of a lookup table's ``[V, dim]`` weight whose per-example gradient has row
    v equal to ``sum_{j: example_j = b, idx_j = v} rows_j``: lookups ``j`` of example
    ``example[j]`` at row ``idx[j]`` with gradient ``rows[j]``.

    Rows of one (example, table row) are summed (:func:`~sgdlab.stats._base.row_sums`: static
    shapes, so no host synchronisation on a GPU) and squared."""
    seg_key, agg = row_sums(example * V + idx, rows)
    if "weight" in call.materialize:  # shared (a tied output head): the rows of each example
        return Contribution(rows=(torch.div(seg_key, V, rounding_mode="floor"), seg_key % V, agg))
    moment, norms = row_moments(seg_key, agg, V, call.scale, call.norms, B)
    return Contribution(moment=moment, sq_norms=norms)


register(nn.Embedding, Rule(embedding_rule, check=check_embedding))
