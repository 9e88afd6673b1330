"""One fused kernel for the 2-D ``nn.Linear`` calls of a backward pass on a GPU (Triton).

For a call with input ``a`` ``[B, in]`` and output gradient ``d`` ``[B, out]`` the moments are

    W = scale * (d*d)^T (a*a)        b = scale * sum_b d_b^2

(:func:`sgdlab.stats.linear.linear_moments`). With torch operations that is one multi-tensor
square, then a matrix product and a matrix-vector product per layer: on a GPU each is a kernel
launch, and for a small model the launches, not the arithmetic, are the cost. Here every layer
of the pass (up to :data:`MAX_LAYERS` per launch) is one tile range of a single grouped kernel:
a tile ``[BM x BN]`` of ``[W | b]`` (the bias is the column ``in`` of an input padded with ones)
loads ``d`` and ``a`` in blocks of examples, squares them in registers and accumulates
``(d^2)^T (a^2)`` in fp32 with IEEE (non-TF32) products. So the squares never reach memory and
one launch replaces ``1 + 2L``.

Used for fp32 parameters on CUDA when Triton is installed (inputs in fp32, fp16 or bf16 are
converted to fp32 on load, as the torch path converts them to the parameter's dtype); other
cases take the torch path. The two agree to fp32 rounding (summation order differs). The
kernel is compiled on the first backward pass that uses it (a few seconds, once per process and
layer layout). ``SGDLAB_FUSED=0`` in the environment turns it off.

Its cost against the torch path: benchmarks/README.md ("Augmented backward").
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["MAX_LAYERS", "available", "disable", "fused_linear_moments"]

MAX_LAYERS = 4
BM, BN, BK = 64, 64, 32
_kernel: object = None  # the compiled-on-demand grouped kernel; False: Triton unavailable


def available(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the fused kernel serves a call on ``t`` with parameters of ``dtype`` (imports
    Triton on the first CUDA call)."""
    if not t.is_cuda or dtype is not torch.float32:
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
        from ._fused_linear_kernel import grouped
    except ImportError:  # pragma: no cover - depends on the installation
        _kernel = False
        return
    _kernel = grouped


def disable(error: BaseException) -> None:
    """Turn the kernel off for this process after it failed (warned once)."""
    global _kernel
    _kernel = False
    warnings.warn(
        f"sgdlab.stats: the fused Triton kernel failed ({type(error).__name__}: {error}); "
        "using torch operations for the Linear statistics from now on",
        RuntimeWarning,
        stacklevel=2,
    )


def fused_linear_moments(
    calls: list[tuple[bool, torch.Tensor, torch.Tensor]], scale: float
) -> list[tuple[torch.Tensor, ...]]:
    """Per call ``(bias, a, d)`` (``a`` ``[B, in]``, ``d`` ``[B, out]``, one batch size B and
    one device for all calls, weight always requested): ``(W, b)`` or ``(W,)`` as in
    ``linear_moments``, in fp32."""
    if _kernel is None:
        _build()
    out: list[tuple[torch.Tensor, ...]] = []
    for i in range(0, len(calls), MAX_LAYERS):
        out += _launch(calls[i : i + MAX_LAYERS], scale)
    return out


def _launch(
    calls: list[tuple[bool, torch.Tensor, torch.Tensor]], scale: float
) -> list[tuple[torch.Tensor, ...]]:
    args: list = []
    has_b: list[bool] = []
    results: list[tuple[torch.Tensor, ...]] = []
    tiles = 0
    B = calls[0][1].shape[0]
    for j, (bias, a, d) in enumerate(calls):
        if not a.is_contiguous():
            a = a.contiguous()
        if not d.is_contiguous():
            d = d.contiguous()
        n_in, n_out = a.shape[1], d.shape[1]
        w = torch.empty((n_out, n_in), dtype=torch.float32, device=d.device)
        b = torch.empty(n_out, dtype=torch.float32, device=d.device) if bias else w
        ntn = _cdiv(n_in + 1 if bias else n_in, BN)
        args += [a, d, w, b, n_in, n_out, ntn]
        if j:
            args.append(tiles)  # first tile of this layer
        tiles += _cdiv(n_out, BM) * ntn
        has_b.append(bias)
        results.append((w, b) if bias else (w,))
    while len(has_b) < MAX_LAYERS:  # unused slots: never reached
        args += args[:7] + [tiles]
        has_b.append(False)
    _kernel[(tiles,)](
        *args, B, scale, HB0=has_b[0], HB1=has_b[1], HB2=has_b[2], HB3=has_b[3], BM=BM, BN=BN, BK=BK
    )
    return results


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
