"""The Triton kernel of :mod:`sgdlab.stats._fused_linear` (imported only where it is used)."""

import triton
import triton.language as tl

__all__ = ["grouped"]


@triton.jit
def _tile(
    t,
    a_ptr,
    d_ptr,
    w_ptr,
    b_ptr,
    IN,
    OUT,
    NTN,
    B,
    scale,
    HAS_B: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """One ``[BM x BN]`` tile of ``scale * (d^2)^T [a^2 | 1]`` (64-bit offsets)."""
    pm = t // NTN
    pn = t % NTN
    rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pn * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, B, BK):
        kk = k0 + rk
        in_b = kk[:, None] < B
        dt = tl.load(
            d_ptr + kk[:, None] * OUT + rm[None, :], mask=in_b & (rm[None, :] < OUT), other=0.0
        ).to(tl.float32)
        at = tl.load(
            a_ptr + kk[:, None] * IN + rn[None, :], mask=in_b & (rn[None, :] < IN), other=0.0
        ).to(tl.float32)
        at = at * at
        if HAS_B:
            at = tl.where(in_b & (rn[None, :] == IN), 1.0, at)
        dt = dt * dt
        acc += tl.dot(tl.trans(dt), at, input_precision="ieee")
    acc = acc * scale
    row = rm[:, None] < OUT
    tl.store(w_ptr + rm[:, None] * IN + rn[None, :], acc, mask=row & (rn[None, :] < IN))
    if HAS_B:
        tl.store(b_ptr + rm[:, None] + 0 * rn[None, :], acc, mask=row & (rn[None, :] == IN))


@triton.jit
def grouped(
    a0,
    d0,
    w0,
    b0,
    IN0,
    OUT0,
    NTN0,
    a1,
    d1,
    w1,
    b1,
    IN1,
    OUT1,
    NTN1,
    T1,
    a2,
    d2,
    w2,
    b2,
    IN2,
    OUT2,
    NTN2,
    T2,
    a3,
    d3,
    w3,
    b3,
    IN3,
    OUT3,
    NTN3,
    T3,
    B,
    scale,
    HB0: tl.constexpr,
    HB1: tl.constexpr,
    HB2: tl.constexpr,
    HB3: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Tiles of up to four layers in one launch."""
    # layer j owns tiles [T_j, T_j+1); unused slots start at the total (never reached)
    t = tl.program_id(0)
    if t < T1:
        _tile(t, a0, d0, w0, b0, IN0, OUT0, NTN0, B, scale, HB0, BM, BN, BK)
    elif t < T2:
        _tile(t - T1, a1, d1, w1, b1, IN1, OUT1, NTN1, B, scale, HB1, BM, BN, BK)
    elif t < T3:
        _tile(t - T2, a2, d2, w2, b2, IN2, OUT2, NTN2, B, scale, HB2, BM, BN, BK)
    else:
        _tile(t - T3, a3, d3, w3, b3, IN3, OUT3, NTN3, B, scale, HB3, BM, BN, BK)
