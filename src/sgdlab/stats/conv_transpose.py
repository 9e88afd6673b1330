"""Rule for ``nn.ConvTranspose1d``, ``nn.ConvTranspose2d``, ``nn.ConvTranspose3d`` (stride,
padding, output padding, dilation, groups).

A transposed convolution is the adjoint of a convolution: ``y = A_W^T x``, where ``A_W`` is the
convolution with the same weight, stride, padding and dilation that maps the output space back
to the input space (the weight ``[C_in, C_out / groups, *kernel]`` read as a convolution from
``C_out`` to ``C_in`` channels). With ``d = dL/dy`` the loss depends on W through
``<d, A_W^T x> = <A_W d, x>``, so example b's weight gradient is the weight gradient of that
convolution with input ``d_b`` and output gradient ``x_b``:

    G_b[i, o, k] = sum_p x_b[i, p] * patch(d_b)[o, k, p]

over the input positions p, with the patches of ``d_b`` (zero-padded by ``padding``) taken with
the module's kernel size, stride and dilation: one im2col of ``d`` and one batched matmul per
chunk of examples, as for a convolution (:mod:`sgdlab.stats.conv`); within a group, channels
pair as in the forward. ``output_padding`` only extends ``y`` on the far side, beyond every
patch. Like a convolution's, the gradient is a sum over positions before squaring, so it is
materialised (in chunks under the memory budget). Bias: ``sum_p d_bp``.

Reference: the adjoint relation of transposed convolutions, Dumoulin & Visin (2016) "A guide to
convolution arithmetic for deep learning"; per-example gradients of convolutions, Rochette,
Manoel & Tramel (2019).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._base import Call, Contribution, reduce_per_example
from ._registry import Rule, register
from .conv import _bias, _im2col, _zero_pad, conv_call

__all__ = ["conv_transpose_rule"]


def conv_transpose_rule(call: Call) -> dict[str, Contribution]:
    """Per-example statistics of ``weight`` and ``bias`` of one transposed-convolution call."""
    found = conv_call(call)
    if found is None:
        return {}
    module = call.module
    x, d, nd = found
    out: dict[str, Contribution] = {}
    names = set(call.param_names)
    if "weight" in names:
        out["weight"] = _weight(call, module, x, d, nd)
    if "bias" in names:
        out["bias"] = _bias(call, d)
    return out


def _weight(call: Call, module: torch.nn.Module, x: Tensor, d: Tensor, nd: int) -> Contribution:
    B, groups = x.shape[0], module.groups
    kernel = list(module.kernel_size)
    in_sizes = tuple(x.shape[2:])
    P = math.prod(in_sizes)
    dp = _zero_pad(d, list(module.padding))  # d padded as the adjoint convolution pads it
    xg = x.reshape(B * groups, x.shape[1] // groups, P)
    # per example: the im2col rows of d over the input positions, and x in a contiguous copy
    extra = (d.shape[1] * math.prod(kernel) + x.shape[1]) * P * x.element_size()

    def make(s: slice) -> Tensor:
        patches = _im2col(dp[s], kernel, list(module.stride), list(module.dilation), in_sizes)
        n = patches.shape[0]
        if groups > 1:
            patches = patches.view(n * groups, patches.shape[1] // groups, P)
        xs = xg[s.start * groups : s.stop * groups]
        return torch.bmm(xs, patches.transpose(1, 2)).view(n, -1)

    return reduce_per_example("weight", call, module.weight.shape, d, make, extra)


for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register(_cls, Rule(conv_transpose_rule))
