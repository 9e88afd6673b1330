"""Rule for an affine map whose weight is stored ``[in, out]``: ``y = x W + b``.

Hugging Face's ``transformers.pytorch_utils.Conv1D`` (the projections of GPT and GPT-2) is such
a map; it is recognised by its class and module name, so ``transformers`` is never imported.
Example b's weight gradient is the transpose of a linear layer's, ``A_b^T D_b`` (``[in, out]``),
so the statistics are those of :mod:`sgdlab.stats.linear` with the roles of input and output
gradient swapped: on ``[B, in]`` one extra product ``(a*a)^T (d*d)``; on ``[B, T..., in]`` the
per-example gradients in chunks of examples.
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
from .linear import affine_moments

__all__ = ["is_hf_conv1d", "transposed_linear_rule"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is ``transformers``' ``Conv1D`` (``x @ weight + bias``, weight
    ``[nx, nf]``)."""
    cls = type(module)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers.")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 2
    )


def transposed_linear_rule(call: Call) -> dict[str, Contribution]:
    """Per-example statistics of ``weight`` (``[in, out]``) and ``bias`` of one call."""
    module = call.module
    (d,) = call.grads
    if d is None:
        return {}
    dtype = module.weight.dtype
    a = in_dtype(call.args[0], dtype)
    d = in_dtype(d, dtype)
    names = call.param_names
    weight = "weight" if "weight" in names else None
    bias = "bias" if "bias" in names else None
    if a.dim() == 2:  # z = W^T a + b: the linear statistics with a and d swapped, for W
        return {
            **affine_moments(call, a, d, weight, None),
            **affine_moments(call, d, a, None, bias),
        }
    require_batched(module, a, 2, "inputs [B, in] or [B, T, ..., in]")
    B = call.batch_size
    a3 = a.reshape(B, -1, a.shape[-1])
    d3 = d.reshape(B, -1, d.shape[-1])
    out: dict[str, Contribution] = {}
    if bias is not None:
        out[bias] = small_per_example(bias, call, d3.sum(1))
    if weight in call.materialize:  # G_b = A_b^T D_b, summed with the other uses
        out["weight"] = Contribution(factors=(a3, d3))
    elif weight is not None:
        out["weight"] = reduce_per_example(
            "weight",
            call,
            module.weight.shape,
            a3,
            lambda s: torch.bmm(a3[s].transpose(1, 2), d3[s]),
        )
    return out


# transformers.pytorch_utils.Conv1D, known by name (transformers is never imported)
register("transformers.Conv1D", Rule(transposed_linear_rule, applies=is_hf_conv1d))
