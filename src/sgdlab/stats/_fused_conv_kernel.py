"""The Triton kernel of :mod:`sgdlab.stats._fused_conv` (imported only where it is used)."""

import triton
import triton.language as tl

__all__ = ["conv2d_moments"]


@triton.jit
def conv2d_moments(
    x_ptr, d_ptr, out_ptr,
    B, C, H, W, CO, OH, OW, KH, KW,
    sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
    SH, SW, DH, DW, PH, PW,
    K, NTN, PER_GROUP, scale,
    HAS_B: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
):
    """Tile ``[BM x BN]`` of ``scale * sum_b (G_b)^2`` for the examples of one group, added
    atomically to ``out`` (``[CO, K]`` weight entries, then ``CO`` bias entries).
    ``G_b = d_b X_b^T`` with ``X_b`` the im2col matrix of example b read in place (zero padding
    by masks); the bias column reads ones, so its entry is ``(sum_p d_bp)^2``."""
    t = tl.program_id(0)
    grp = tl.program_id(1)
    pm = t // NTN
    pn = t % NTN
    rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)  # output channels
    rn = (pn * BN + tl.arange(0, BN)).to(tl.int64)  # patch entries (c, ki, kj)
    rp = tl.arange(0, BP).to(tl.int64)  # output positions
    kk = KH * KW
    c = rn // kk
    ki = (rn % kk) // KW
    kj = rn % KW
    in_k = rn < K
    in_m = rm < CO
    P = OH * OW
    total = tl.zeros((BM, BN), dtype=tl.float32)
    b0 = grp * PER_GROUP
    for b in range(b0, tl.minimum(b0 + PER_GROUP, B)):
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for p0 in range(0, P, BP):
            p = p0 + rp
            in_p = p < P
            oh = p // OW
            ow = p % OW
            dt = tl.load(d_ptr + b * sdb + rm[:, None] * sdc + oh[None, :] * sdh
                         + ow[None, :] * sdw,
                         mask=in_m[:, None] & in_p[None, :], other=0.0).to(tl.float32)
            ih = oh[:, None] * SH + ki[None, :] * DH - PH
            iw = ow[:, None] * SW + kj[None, :] * DW - PW
            ok = (in_p[:, None] & in_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0)
                  & (iw < W))
            xt = tl.load(x_ptr + b * sxb + c[None, :] * sxc + ih * sxh + iw * sxw,
                         mask=ok, other=0.0).to(tl.float32)
            if HAS_B:
                xt = tl.where(in_p[:, None] & (rn[None, :] == K), 1.0, xt)
            acc += tl.dot(dt, xt, input_precision="ieee")
        total += acc * acc
    total = total * scale
    # out: the weight's [CO, K] entries, then the bias's CO entries
    where = tl.where(rn[None, :] == K, CO * K + rm[:, None], rm[:, None] * K + rn[None, :])
    width = K + 1 if HAS_B else K
    tl.atomic_add(out_ptr + where, total, mask=in_m[:, None] & (rn[None, :] < width))
