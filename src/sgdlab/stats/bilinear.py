"""Rule for ``nn.Bilinear``: ``y_o = x1^T A_o x2 + b_o`` on inputs ``[B, ..., in1]`` and
``[B, ..., in2]``.

Example b's weight gradient is ``G_b[o, i, j] = sum_t d_bto x1_bti x2_btj`` over its positions
t. On ``[B, in]`` inputs (one position) no per-example tensor is needed:

    sum_b G_b[o, i, j]^2 = sum_b d_bo^2 (x1_bi x2_bj)^2 = ((d*d)^T K)[o, (i, j)],
    K_b = (x1_b * x1_b) (x) (x2_b * x2_b)        (row-wise Kronecker product, [B, in1 * in2])

one matrix product, as for ``nn.Linear`` with the input ``x1 (x) x2``. With positions the sum
over t comes before squaring, so ``G_b`` is materialised in chunks of examples under the memory
budget (one batched matmul per chunk). Bias: ``sum_t d_bt``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import (
    Call,
    Contribution,
    in_dtype,
    reduce_per_example,
    require_batched,
    small_per_example,
)
from ._registry import Rule, register

__all__ = ["bilinear_rule"]


def bilinear_rule(call: Call) -> dict[str, Contribution]:
    """Per-example statistics of ``weight`` and ``bias`` of one ``nn.Bilinear`` call."""
    module: nn.Bilinear = call.module  # type: ignore[assignment]
    (d,) = call.grads
    if d is None:
        return {}
    dtype = module.weight.dtype
    x1 = in_dtype(call.args[0], dtype)
    x2 = in_dtype(call.args[1], dtype)
    d = in_dtype(d, dtype)
    require_batched(module, x1, 2, "inputs [B, ..., in1] and [B, ..., in2]")
    B = call.batch_size
    out_f, in1, in2 = module.weight.shape
    a = x1.reshape(B, -1, in1)
    c = x2.reshape(B, -1, in2)
    dd = d.reshape(B, -1, out_f)
    names = call.param_names
    out: dict[str, Contribution] = {}
    if "weight" in names:
        if a.shape[1] == 1 and "weight" not in call.materialize:
            d2 = dd[:, 0] * dd[:, 0]
            k = a[:, 0, :, None] * a[:, 0, :, None] * (c[:, 0, None, :] * c[:, 0, None, :])
            k = k.reshape(B, in1 * in2)
            moment = torch.mm(d2.T, k).mul_(call.scale).view(out_f, in1, in2)
            norms = d2.sum(1) * k.sum(1) if call.norms else None
            out["weight"] = Contribution(moment, None, norms)
        else:

            def make(s: slice) -> torch.Tensor:
                # G_b[o, (i, j)] = sum_t d_bto (x1_bti x2_btj)
                ac = (a[s, :, :, None] * c[s, :, None, :]).reshape(-1, a.shape[1], in1 * in2)
                return torch.bmm(dd[s].transpose(1, 2), ac).view(ac.shape[0], -1)

            extra = a.shape[1] * in1 * in2 * a.element_size()
            out["weight"] = reduce_per_example("weight", call, module.weight.shape, d, make, extra)
    if "bias" in names:
        out["bias"] = small_per_example("bias", call, dd.sum(1))
    return out


register(nn.Bilinear, Rule(bilinear_rule))
