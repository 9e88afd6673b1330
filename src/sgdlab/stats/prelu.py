"""Rule for ``nn.PReLU``: ``y = max(0, x) + a * min(0, x)``, one slope ``a`` shared by all
channels (``num_parameters=1``) or one per channel (dimension 1 of the input, which torch
requires to have ``num_parameters`` entries, so a batched input).

Example b's gradient of a slope is ``sum_p d_bp * min(0, x_bp)`` over the positions p that share
it (every entry of the example, or those of one channel): a small ``[B, num_parameters]`` tensor,
formed directly.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import Call, Contribution, in_dtype, small_per_example
from ._registry import Rule, register

__all__ = ["prelu_rule"]


def prelu_rule(call: Call) -> dict[str, Contribution]:
    """Per-example statistics of ``weight`` (the slopes) of one ``nn.PReLU`` call."""
    module: nn.PReLU = call.module  # type: ignore[assignment]
    (d,) = call.grads
    if d is None or "weight" not in call.param_names:
        return {}
    dtype = module.weight.dtype
    x = in_dtype(call.args[0], dtype)
    d = in_dtype(d, dtype)
    B, n = x.shape[0], module.num_parameters
    t = d * torch.clamp(x, max=0)
    v = t.reshape(B, n, -1).sum(2) if n > 1 else t.reshape(B, 1, -1).sum(2)
    return {"weight": small_per_example("weight", call, v)}


register(nn.PReLU, Rule(prelu_rule))
