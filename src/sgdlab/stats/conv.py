"""Rule for ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` (stride, padding, dilation, groups,
padding modes).

A convolution applies one kernel at every output position, so example b's weight gradient is a
sum over positions, ``G_b = sum_p d_bp a_bp^T`` (``a_bp`` the input patch), and the second
moment ``sum_b G_b^2`` needs ``G_b`` itself: squaring per position underestimates or
overestimates it by tens of percent on natural images.

Two exact ways to form ``G_b`` for a chunk of n examples (``conv_strategy``):

* ``"grouped"``: one weight-gradient convolution with the batch folded into the channel axis
  (input ``[1, n*C_in, ...]``, output gradient ``[1, n*C_out, ...]``, ``groups = n * groups``);
  no im2col buffer, but backends run very many small groups slowly.
* ``"unfold"``: im2col of the input, ``[n, C_in*k, P]`` (one strided view and one copy), and
  one batched matmul with the output gradient ``[n, C_out, P]`` per group; fast, at the price
  of the im2col buffer (counted against the memory budget).

``"auto"`` is ``"unfold"``. Bias: ``sum_p d_bp``.

Reference: Rochette, Manoel & Tramel (2019) "Efficient per-example gradient computations in
convolutional neural networks".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import (
    Call,
    Contribution,
    in_dtype,
    in_param_dtype,
    reduce_per_example,
    require_batched,
    small_per_example,
    square_sum,
)
from ._registry import FastPath, Rule, register

__all__ = ["conv_call", "conv_moments", "conv_rule"]


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


def conv_call(call: Call) -> tuple[Tensor, Tensor, int] | None:
    """The input and output gradient of a (transposed) convolution call in the weight's dtype
    and its number of spatial dims, or ``None`` when the output got no gradient; an unbatched
    input raises."""
    module = call.module
    (d,) = call.grads
    if d is None:
        return None
    nd = len(module.kernel_size)
    x = in_dtype(call.args[0], module.weight.dtype)
    require_batched(module, x, nd + 2, f"inputs [B, C, {nd} spatial dims]")
    return x, in_dtype(d, module.weight.dtype), nd


def conv_rule(call: Call) -> dict[str, Contribution]:
    """Per-example statistics of ``weight`` and ``bias`` of one convolution call."""
    found = conv_call(call)
    if found is None:
        return {}
    module = call.module
    x, d, nd = found
    out: dict[str, Contribution] = {}
    names = set(call.param_names)
    if "weight" in names:
        xp, padding = _padded_input(module, x, nd)
        w = module.weight
        c_in, c_out, groups = xp.shape[1], d.shape[1], module.groups

        strategy = call.conv_strategy
        if strategy in ("auto", "unfold"):
            return {
                **_unfold_weight(call, module, xp, padding, d, nd),
                **({"bias": _bias(call, d)} if "bias" in names else {}),
            }

        def make(s: slice) -> Tensor:
            xs, ds = xp[s], d[s]
            n = xs.shape[0]
            shape = (n * c_out, c_in // groups, *w.shape[2:])
            fake = w.new_empty(()).expand(shape)
            _, gw, _ = torch.ops.aten.convolution_backward(
                _dense(ds.reshape(1, n * c_out, *ds.shape[2:])),
                _dense(xs.reshape(1, n * c_in, *xs.shape[2:])),
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
        out["bias"] = _bias(call, d)
    return out


def _dense(t: Tensor) -> Tensor:
    """``t`` with the strides of a fresh contiguous tensor: torch counts a tensor with odd
    strides on dims of size 1 (an input made by a transpose) as contiguous, and CPU kernels of
    ``convolution_backward`` then refuse it."""
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= size
    if tuple(reversed(strides)) == t.stride():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _bias(call: Call, d: Tensor) -> Contribution:
    return small_per_example("bias", call, d.sum(tuple(range(2, d.dim()))))


def _im2col(
    xp: Tensor,
    kernel: list[int],
    stride: list[int],
    dilation: list[int],
    out_sizes: tuple[int, ...],
) -> Tensor:
    """Input patches ``[n, C * prod(kernel), prod(out_sizes)]`` (channel-major, then kernel
    offsets, as the weight is laid out), for any number of spatial dims: one strided view and
    one copy. ``xp`` is the padded input, contiguous except for a batch slice."""
    nd = len(kernel)
    st = xp.stride()
    n, c = xp.shape[:2]
    # [n, C, kernel..., out...]: the patch entry (c, k) of output position o in one view
    sizes = (n, c, *kernel, *out_sizes)
    strides = (
        st[0],
        st[1],
        *(st[2 + i] * dilation[i] for i in range(nd)),
        *(st[2 + i] * stride[i] for i in range(nd)),
    )
    patches = xp.as_strided(sizes, strides, xp.storage_offset())
    return patches.reshape(n, c * math.prod(kernel), math.prod(out_sizes))


def _zero_pad(xp: Tensor, padding: list[int]) -> Tensor:
    """``xp`` (padded as the module's forward pads it) with the zero padding the convolution
    adds, contiguous: the input of :func:`_im2col`, padded once for the whole batch (a
    channels-last input is padded in its own layout, then made contiguous)."""
    if not any(padding):
        return xp.contiguous()
    pads: list[int] = []
    for p in reversed(padding):
        pads += [p, p]
    return F.pad(xp, pads).contiguous()


def _im2col_bytes(x: Tensor, d: Tensor, kernel: tuple[int, ...]) -> int:
    """Bytes per example of the im2col rows and the output gradient (``P`` positions)."""
    P = math.prod(d.shape[2:])
    return (x.shape[1] * math.prod(kernel) + d.shape[1]) * P * x.element_size()


def _example_grads(module: nn.Module, xp: Tensor, dg: Tensor, out_sizes: tuple[int, ...]) -> Tensor:
    """``G_b`` for the examples of ``xp`` (zero-padded, contiguous or a batch slice), given
    their output gradients ``dg`` ``[n * groups, C_out / groups, P]`` over the output positions
    ``out_sizes``: ``[n, weight.numel()]`` (fresh, so it may be squared in place)."""
    xs = _im2col(
        xp, list(module.kernel_size), list(module.stride), list(module.dilation), out_sizes
    )
    n = xs.shape[0]
    groups = module.groups
    if groups > 1:
        xs = xs.reshape(n * groups, xs.shape[1] // groups, xs.shape[2])
    return torch.bmm(dg, xs.transpose(1, 2)).view(n, -1)


def _unfold_weight(
    call: Call, module: nn.Module, xp: Tensor, padding: list[int], d: Tensor, nd: int
) -> dict[str, Contribution]:
    """``G_b`` by im2col and one batched matmul per chunk."""
    extra = _im2col_bytes(xp, d, module.kernel_size)
    xp = _zero_pad(xp, padding)
    B, groups, out_sizes = xp.shape[0], module.groups, tuple(d.shape[2:])
    dg = d.reshape(B * groups, d.shape[1] // groups, -1)

    def make(s: slice) -> Tensor:
        if s.start == 0 and s.stop == B:  # no slicing: fewer calls for one chunk
            return _example_grads(module, xp, dg, out_sizes)
        return _example_grads(module, xp[s], dg[s.start * groups : s.stop * groups], out_sizes)

    return {"weight": reduce_per_example("weight", call, module.weight.shape, d, make, extra)}


def conv_moments(
    module: nn.Module,
    x: Tensor,
    d: Tensor,
    scale: float,
    memory_budget: int,
    weight: bool,
    bias: bool,
) -> tuple[Tensor, ...] | None:
    """The moments of one convolution call in the common case, with little host work:
    ``scale * sum_b G_b^2`` for the weight (im2col, one batched matmul, an in-place square and
    one matrix-vector product) and ``scale * sum_b (sum_p d_bp)^2`` for the bias (those
    requested, in this order). Returns ``None`` where the general :func:`conv_rule` is needed:
    per-example gradients that do not fit ``memory_budget`` in one chunk. Same kernels and
    results as :func:`conv_rule` with ``conv_strategy="unfold"``.
    """
    x, d = in_param_dtype(module, x, d)
    nd = d.dim() - 2
    if x.dim() != nd + 2:
        require_batched(module, x, nd + 2, f"inputs [B, C, {nd} spatial dims]")
    B = d.shape[0]
    out: list[Tensor] = []
    if weight:
        w = module.weight
        per_example = w.numel() * x.element_size() + _im2col_bytes(x, d, module.kernel_size)
        if per_example * B > memory_budget:
            return None  # chunks: the general rule
        xp = _zero_pad(*_padded_input(module, x, nd))
        groups = module.groups
        g = _example_grads(
            module, xp, d.reshape(B * groups, d.shape[1] // groups, -1), tuple(d.shape[2:])
        )
        out.append(square_sum(g, scale).view(w.shape))
    if bias:
        out.append(square_sum(d.sum(tuple(range(2, d.dim()))), scale))
    return tuple(out)


# calls on [B, C, *spatial] take conv_moments (the unfold strategy: not with "grouped")
_FAST = FastPath(
    conv_moments,
    ndim=lambda module: len(module.kernel_size) + 2,
    when=lambda module, tracker: tracker.conv_strategy != "grouped",
)
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register(_cls, Rule(conv_rule, fast=_FAST))
