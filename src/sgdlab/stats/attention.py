"""Rule for ``nn.MultiheadAttention``: exact per-example gradients of the input and output
projections.

With projected queries, keys and values ``q = x_q W_q^T + b_q`` (likewise k, v) and the
attention output ``o`` fed to ``out_proj``, example b's gradients are sums over positions,
``dW_q = sum_t dq_bt x_q,bt^T`` and ``dW_o = sum_t dy_bt o_bt^T`` (biases: sums of ``dq``,
``dy``). The rule reruns the attention from the saved inputs and the module's weights (masks
merged as torch does: boolean entries ``True`` are masked out, float entries are added),
asks autograd for ``dq, dk, dv, do`` given the output gradients (of the attention output and,
when requested, of the returned attention weights), and forms the per-example gradients with
batched matmuls in chunks of examples. In self-attention (query, key and value one tensor x)
the three projections are one product ``x W_in^T`` and their per-example gradients one batched
product ``[dq | dk | dv]^T x``.

With active dropout (training mode, ``dropout > 0``: ``nn.TransformerEncoderLayer``'s default)
the attention is rerun by torch's own ``F.multi_head_attention_forward`` from the generator
states recorded just before the call (:mod:`sgdlab.stats._rng`), so it draws the forward pass's
dropout masks, as activation checkpointing does; the rule hands it the projected q, k, v with
identity projection weights (exact in IEEE arithmetic; TF32 matmuls would round q, k, v). A
per-example 3-D ``attn_mask`` takes the same path without the generators. Configurations with
``add_bias_kv`` or ``add_zero_attn`` take the ``torch.func`` fallback, which cannot reproduce
dropout (refused there).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _rng
from ._base import Call, Contribution, in_dtype, reduce_per_example, small_per_example
from ._registry import Rule, register
from .fallback import check_fallback, fallback_batch_size, fallback_params, fallback_rule

__all__ = ["attention_rule", "check_attention"]

_POS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


def _arguments(call: Call) -> dict[str, Any]:
    bound = dict(zip(_POS, call.args, strict=False))
    bound.update(call.kwargs)
    return bound


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _supported(m: nn.MultiheadAttention) -> bool:
    return m.bias_k is None and not m.add_zero_attn


def check_attention(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """The dedicated rule replays active dropout; the fallback's configurations cannot."""
    if not _supported(module):  # type: ignore[arg-type]
        check_fallback(module, args, kwargs)


def _replayed(
    m: nn.MultiheadAttention, a: dict[str, Any], rng: Any, qp: Tensor, kp: Tensor, vp: Tensor
) -> tuple[Tensor, Tensor | None]:
    """The attention output before ``out_proj`` (``[B, L, E]``) and the returned weights, by
    torch's own function on the projected ``qp, kp, vp`` (``[B, L|S, E]``) from the call's
    generator states ``rng`` (``None``: no dropout), so with the forward pass's masks."""
    E = m.embed_dim
    eye = torch.eye(E, dtype=qp.dtype, device=qp.device)
    dropout = m.dropout if m.training else 0.0
    if dropout > 0 and rng is None:
        raise RuntimeError(
            "MultiheadAttention: the generator states of a call with active dropout were not "
            "recorded (its dropout was raised from 0 after the tracker was attached: attach "
            "the tracker again)"
        )
    with _rng.replay(rng, "MultiheadAttention") if dropout > 0 else contextlib.nullcontext():
        z, w = F.multi_head_attention_forward(
            qp.transpose(0, 1),
            kp.transpose(0, 1),
            vp.transpose(0, 1),
            E,
            m.num_heads,
            None,
            None,
            None,
            None,
            False,
            dropout,
            eye,
            None,
            training=dropout > 0,
            key_padding_mask=a.get("key_padding_mask"),
            need_weights=a.get("need_weights", True),
            attn_mask=a.get("attn_mask"),
            use_separate_proj_weight=True,
            q_proj_weight=eye,
            k_proj_weight=eye,
            v_proj_weight=eye,
            average_attn_weights=a.get("average_attn_weights", True),
            is_causal=a.get("is_causal", False),
        )
    return z.transpose(0, 1), w


def _same_tensor(*ts: Any) -> bool:
    """Whether the tensors are one tensor: the same device, memory, shape, strides and dtype
    (so the same values, also for detached copies of one argument)."""
    t0 = ts[0]
    return all(
        isinstance(t, Tensor)
        and t.device == t0.device
        and t.data_ptr() == t0.data_ptr()
        and t.shape == t0.shape
        and t.stride() == t0.stride()
        and t.dtype == t0.dtype
        for t in ts
    )


def _attend(
    qp: Tensor,
    kp: Tensor,
    vp: Tensor,
    H: int,
    mask: Tensor | None,
    kpm: Tensor | None,
    average: bool,
) -> tuple[Tensor, Tensor]:
    """Attention without dropout in plain operations: the output before ``out_proj``
    ``[B, L, E]`` and the weights (averaged over heads if ``average``)."""
    B, L, E = qp.shape
    S = kp.shape[1]
    Dh = E // H
    q = qp.view(B, L, H, Dh).transpose(1, 2)
    k = kp.view(B, S, H, Dh).transpose(1, 2)
    v = vp.view(B, S, H, Dh).transpose(1, 2)
    scores = (q / math.sqrt(Dh)) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    if kpm is not None:
        scores = scores + kpm.view(B, 1, 1, S)
    attn = torch.softmax(scores, -1)
    z = (attn @ v).transpose(1, 2).reshape(B, L, E)
    return z, attn.mean(1) if average else attn


def attention_rule(call: Call) -> dict[str, Contribution]:  # noqa: C901
    """Per-example statistics of the parameters of one ``nn.MultiheadAttention`` call."""
    m: nn.MultiheadAttention = call.module  # type: ignore[assignment]
    a = _arguments(call)
    if not _supported(m):
        return fallback_rule(call)
    dtype = m.out_proj.weight.dtype
    raw = [a[k] for k in ("query", "key", "value")]
    # self-attention (query, key and value one tensor, as the call's arguments or detached
    # copies of them): the three input projections are one product with in_proj_weight, and
    # so are their per-example gradients
    fused = m._qkv_same_embed_dim and _same_tensor(*raw)
    xq, xk, xv = (in_dtype(t, dtype).detach() for t in (raw[:1] * 3 if fused else raw))
    if not m.batch_first:
        xq, xk, xv = xq.transpose(0, 1), xk.transpose(0, 1), xv.transpose(0, 1)
    B, L, E = xq.shape
    H = m.num_heads
    b_in = None if m.in_proj_bias is None else m.in_proj_bias.detach()
    wo = m.out_proj.weight.detach()

    need_weights = a.get("need_weights", True)
    average = a.get("average_attn_weights", True)
    raw_mask = a.get("attn_mask")
    # torch's own function: to replay dropout, or for a per-example 3-D mask
    replay = (m.training and m.dropout > 0) or (raw_mask is not None and raw_mask.dim() == 3)

    g_y = g_w = None
    for j, pos in enumerate(call.out_positions):  # leaves: (attn_output, attn_weights)
        if pos == 0:
            g_y = call.grads[j]
        elif pos == 1:
            g_w = call.grads[j]
    if g_y is None:
        dy = xq.new_zeros(B, L, E)
    else:
        dy = in_dtype(g_y, dtype) if m.batch_first else in_dtype(g_y, dtype).transpose(0, 1)
    do = dy @ wo  # gradient of the attention output before out_proj
    with torch.enable_grad():
        if fused:
            qkv = F.linear(xq, m.in_proj_weight.detach(), b_in).requires_grad_()
            leaves: tuple[Tensor, ...] = (qkv,)
            qp, kp, vp = qkv.chunk(3, -1)
        else:
            if m._qkv_same_embed_dim:
                wq, wk, wv = m.in_proj_weight.detach().chunk(3)
            else:
                wq, wk, wv = (
                    w.detach() for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
                )
            bq, bk, bv = (None, None, None) if b_in is None else b_in.chunk(3)
            qp = F.linear(xq, wq, bq).requires_grad_()
            kp = F.linear(xk, wk, bk).requires_grad_()
            vp = F.linear(xv, wv, bv).requires_grad_()
            leaves = (qp, kp, vp)
        if replay:
            z, weights = _replayed(m, a, call.rng, qp, kp, vp)
        else:
            z, weights = _attend(
                qp,
                kp,
                vp,
                H,
                _additive(raw_mask, dtype),
                _additive(a.get("key_padding_mask"), dtype),
                average,
            )
        targets, cotangents = [z], [do]
        if g_w is not None and need_weights:
            targets.append(weights)
            cotangents.append(in_dtype(g_w, dtype))
        grads = torch.autograd.grad(targets, leaves, cotangents, allow_unused=True)
    grads = tuple(
        torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves, strict=True)
    )
    o = z.detach()

    out: dict[str, Contribution] = {}
    names = set(call.param_names)

    def per_weight(name: str, dz: Tensor, u: Tensor, shape: torch.Size) -> None:
        if name in names:
            out[name] = reduce_per_example(
                name, call, shape, dz, lambda s: torch.bmm(dz[s].transpose(1, 2), u[s])
            )

    if fused:
        (dqkv,) = grads  # [B, L, 3E]: the gradients of q, k and v side by side
        per_weight("in_proj_weight", dqkv, xq, m.in_proj_weight.shape)
        if "in_proj_bias" in names:
            out["in_proj_bias"] = small_per_example("in_proj_bias", call, dqkv.sum(1))
    else:
        dq, dk, dv = grads
        if m._qkv_same_embed_dim:
            if "in_proj_weight" in names:
                out["in_proj_weight"] = reduce_per_example(
                    "in_proj_weight",
                    call,
                    m.in_proj_weight.shape,
                    dq,
                    lambda s: torch.cat(
                        [
                            torch.bmm(dq[s].transpose(1, 2), xq[s]),
                            torch.bmm(dk[s].transpose(1, 2), xk[s]),
                            torch.bmm(dv[s].transpose(1, 2), xv[s]),
                        ],
                        1,
                    ),
                )
        else:
            per_weight("q_proj_weight", dq, xq, m.q_proj_weight.shape)
            per_weight("k_proj_weight", dk, xk, m.k_proj_weight.shape)
            per_weight("v_proj_weight", dv, xv, m.v_proj_weight.shape)
        if "in_proj_bias" in names:
            out["in_proj_bias"] = small_per_example(
                "in_proj_bias", call, torch.cat([dq.sum(1), dk.sum(1), dv.sum(1)], 1)
            )
    per_weight("out_proj.weight", dy, o, m.out_proj.weight.shape)
    if "out_proj.bias" in names:
        out["out_proj.bias"] = small_per_example("out_proj.bias", call, dy.sum(1))
    return out


register(
    nn.MultiheadAttention,
    Rule(
        attention_rule,
        batch_size=fallback_batch_size,
        check=check_attention,
        params=fallback_params,
        owns_submodules=True,
        dropout=lambda module: module.dropout > 0,
    ),
)
