"""One fused kernel per ``nn.Conv2d`` call for its moments on a GPU (Triton).

The exact moments of a convolution need each example's gradient
``G_b = sum_p d_bp x_bp^T`` (:mod:`sgdlab.stats.conv`). With torch operations that is a pad, an
im2col copy, a batched matrix product, a square and a reduction for the weight, and three more
kernels for the bias: nine launches per call, which is what a small convolutional network pays
on a GPU, where its step is bound by launches rather than arithmetic. Here one kernel reads the
im2col matrix in place (zero padding by masks, no buffer), forms ``G_b`` tile by tile with IEEE
fp32 products, squares it in registers and adds ``scale * sum_b G_b^2`` atomically into a zeroed
output (examples split in groups so that the GPU is filled even for few output tiles); the bias
is an extra column of ones. Two launches in all (the zeroing and the kernel), and no
per-example memory, so no chunks.

Used for ``nn.Conv2d`` with ``groups=1`` and fp32 parameters on CUDA when Triton is installed
and deterministic algorithms are not requested (the atomic sums make the last bits depend on the
order the groups finish); other cases take the torch path, with which it agrees to fp32
rounding. ``SGDLAB_FUSED=0`` in the environment turns it off (with the Linear kernel).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

__all__ = ["available", "fused_conv2d_moments"]

BM, BN, BP = 32, 32, 32
_kernel: object = None  # compiled on demand; False: Triton unavailable or failed
_programs: dict[int, int] = {}  # device index -> programs to aim for (4 per multiprocessor)


def available(module: nn.Module, x: Tensor) -> bool:
    """Whether the fused kernel serves this call (imports Triton on the first CUDA call)."""
    if not (x.is_cuda and module.weight.dtype is torch.float32 and module.groups == 1
            and len(module.kernel_size) == 2):
        return False
    if torch.are_deterministic_algorithms_enabled():
        return False
    if _kernel is None:
        _build()
    return _kernel is not False


def _build() -> None:
    global _kernel
    if os.environ.get("SGDLAB_FUSED", "1") == "0":
        _kernel = False
        return
    try:  # Triton ships with CUDA builds of torch; without it the torch path is used
        from ._fused_conv_kernel import conv2d_moments
    except ImportError:  # pragma: no cover - depends on the installation
        _kernel = False
        return
    _kernel = conv2d_moments


def disable() -> None:
    """Turn the kernel off for this process (after a failure)."""
    global _kernel
    _kernel = False


def fused_conv2d_moments(module: nn.Module, xp: Tensor, padding: list[int], d: Tensor,
                         scale: float, bias: bool) -> tuple[Tensor, ...]:
    """``(W, b)`` or ``(W,)``: ``scale * sum_b G_b^2`` for the weight and
    ``scale * sum_b (sum_p d_bp)^2`` for the bias, from the input ``xp`` (padded as the module
    pads it, ``padding`` the zero padding left) and the output gradient ``d``."""
    if _kernel is None:
        _build()
    B, C, H, W = xp.shape
    CO, OH, OW = d.shape[1:]
    kh, kw = module.kernel_size
    K = C * kh * kw
    width = K + 1 if bias else K
    out = torch.zeros(CO * width, dtype=torch.float32, device=d.device)
    ntn = -(-width // BN)
    tiles = -(-CO // BM) * ntn
    dev = d.device.index or 0
    aim = _programs.get(dev)
    if aim is None:
        aim = _programs[dev] = 4 * torch.cuda.get_device_properties(d.device).multi_processor_count
    per_group = -(-B // max(1, min(B, -(-aim // tiles))))
    groups = -(-B // per_group)
    _kernel[(tiles, groups)](  # type: ignore[index]
        xp, d, out, B, C, H, W, CO, OH, OW, kh, kw, *xp.stride(), *d.stride(),
        *module.stride, *module.dilation, *padding, K, ntn, per_group, scale,
        HAS_B=bias, BM=BM, BN=BN, BP=BP,
    )
    if not bias:
        return (out.view(module.weight.shape),)
    w, b = torch.split(out, [CO * K, CO])
    return w.view(module.weight.shape), b
