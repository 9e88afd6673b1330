"""Rule for ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` (stride, padding, dilation, groups,
padding modes).

A convolution applies one kernel at every output position, so example b's weight gradient is a
sum over positions, ``G_b = sum_p d_bp a_bp^T`` (``a_bp`` the input patch), and the second
moment ``sum_b G_b^2`` needs ``G_b`` itself: squaring per position underestimates or
overestimates it by tens of percent on natural images.

``G_b`` for a chunk of n examples is one weight-gradient convolution in which the batch is folded
into the channel axis: input ``[1, n*C_in, ...]``, output gradient ``[1, n*C_out, ...]`` and
``groups = n * groups``. Its cost is that of the ordinary weight gradient of the chunk. Bias:
``sum_p d_bp``.

Reference: Rochette, Manoel & Tramel (2019) "Efficient per-example gradient computations in
convolutional neural networks".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import Call, Contribution, reduce_per_example, require_batched, small_per_example

__all__ = ["conv_rule"]


def _same_padding(module: nn.Module, nd: int) -> list[int]:
    """F.pad widths (last dim first) that reproduce ``padding='same'``."""
    pads: list[int] = []
    for i in reversed(range(nd)):
        total = module.dilation[i] * (module.kernel_size[i] - 1)
        left = total // 2
        pads += [left, total - left]
    return pads


def _padded_input(module: nn.Module, x: Tensor, nd: int) -> tuple[Tensor, list[int]]:
    """Input padded as the module's forward pads it, and the padding left to the conv."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return x, [0] * nd
        pads = _same_padding(module, nd)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, pads, mode=mode), [0] * nd
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), [0] * nd
    return x, list(module.padding)


def conv_rule(call: Call) -> dict[str, Contribution]:
    """Per-example statistics of ``weight`` and ``bias`` of one convolution call."""
    module = call.module
    (d,) = call.grads
    if d is None:
        return {}
    nd = len(module.kernel_size)
    x = call.args[0]
    require_batched(module, x, nd + 2, f"inputs [B, C, {nd} spatial dims]")
    B = call.batch_size
    out: dict[str, Contribution] = {}
    names = set(call.param_names)
    if "weight" in names:
        xp, padding = _padded_input(module, x, nd)
        w = module.weight
        c_in, c_out, groups = xp.shape[1], d.shape[1], module.groups

        def make(s: slice) -> Tensor:
            xs, ds = xp[s], d[s]
            n = xs.shape[0]
            shape = (n * c_out, c_in // groups, *w.shape[2:])
            fake = w.new_empty(()).expand(shape)
            _, gw, _ = torch.ops.aten.convolution_backward(
                ds.reshape(1, n * c_out, *ds.shape[2:]),
                xs.reshape(1, n * c_in, *xs.shape[2:]),
                fake,
                None,
                list(module.stride),
                padding,
                list(module.dilation),
                False,
                [0] * nd,
                n * groups,
                [False, True, False],
            )
            return gw.reshape(n, *w.shape)

        out["weight"] = reduce_per_example("weight", call, w.shape, d, make)
    if "bias" in names:
        out["bias"] = small_per_example("bias", call, d.reshape(B, d.shape[1], -1).sum(2))
    return out
