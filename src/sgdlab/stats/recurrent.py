"""Rule for ``nn.RNN``, ``nn.LSTM`` (with ``proj_size``) and ``nn.GRU``: multi-layer,
bidirectional, ``batch_first`` or not.

Every weight is applied at every time step, so example b's gradient is a sum over steps,
``G_b = sum_t dz_bt u_bt^T`` with ``z = W u + b`` a pre-activation and ``u`` what it multiplies
(the layer input for ``weight_ih``, the previous hidden state for ``weight_hh``, the cell output
for ``weight_hr``). The fused kernel does not expose ``dz``, so the rule reruns the recurrence in
plain tensor operations from the saved inputs and the module's weights, asks autograd for the
gradients of the pre-activations given the output gradients, and materialises ``G_b`` in
chunks of examples. The cost is one extra forward and backward of the recurrence.

Packed sequences (``pack_padded_sequence``: example b has its own length ``L_b``) are rerun on
the padded layout in the examples' own order with a mask: at a step ``t >= L_b`` example b's
state is carried unchanged (``h_t = h_{t-1}``, so its final state is the one at ``L_b - 1``; the
reverse direction starts at ``L_b - 1`` from the initial state), which is what the packed kernel
computes; masked steps receive no gradient, so they add nothing to ``G_b``.

Dropout between layers (``dropout > 0`` in training mode) is redrawn: the tracker records the
random generator's state just before the call (:mod:`sgdlab.stats._rng`) and the rerun applies
``torch.dropout`` to each layer's output from that state, the operation, shape and order of
torch's CPU kernel (on ``[T, B, D*H]``, or on the packed data of a packed sequence), so the masks
are the forward pass's (tests check this against the same batch's own gradients). cuDNN draws
its masks with a state of its own: refused with dropout.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import _rng
from ._base import Call, Contribution, reduce_per_example, small_per_example
from ._registry import Rule, register

__all__ = ["rnn_rule", "check_rnn", "rnn_batch_size"]


def check_rnn(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse what the rerun cannot reproduce: inputs without a batch, inter-layer dropout
    drawn by cuDNN (on an accelerator)."""
    x = args[0] if args else kwargs.get("input")
    packed = isinstance(x, PackedSequence)
    if not packed and x.dim() != 3:
        raise ValueError(
            f"{type(module).__name__} got an input of shape {tuple(x.shape)}; per-example "
            "statistics need a batched input with 3 dimensions"
        )
    data = x.data if packed else x
    if (
        module.training
        and module.dropout > 0
        and module.num_layers > 1
        and data.device.type != "cpu"
    ):
        raise ValueError(
            f"{type(module).__name__} has dropout={module.dropout} between layers in training "
            f"mode on {data.device.type}, whose masks cannot be redrawn (they can on the CPU): "
            "set dropout=0 and put nn.Dropout between single-layer modules"
        )


def rnn_batch_size(module: nn.Module, args: tuple, kwargs: dict) -> int:
    x = args[0] if args else kwargs["input"]
    if isinstance(x, PackedSequence):
        return int(x.batch_sizes[0])
    return int(x.shape[0] if module.batch_first else x.shape[1])


def _padded(x: PackedSequence, data: Tensor) -> tuple[Tensor, Tensor]:
    """``data`` laid out as ``x.data`` is, padded to ``[T, B, ...]`` in the examples' order
    (zeros past each example's length), and the lengths ``[B]`` (on the CPU)."""
    packed = PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    return pad_packed_sequence(packed, total_length=len(x.batch_sizes))


def _packed_dropout(x: PackedSequence, padded: Tensor, p: float) -> Tensor:
    """``torch.dropout`` of ``padded`` (``[T, B, F]``, the examples' order) as the kernel draws
    it for a packed sequence: on the packed data, then padded again."""
    order = x.sorted_indices
    if order is None:
        order = torch.arange(padded.shape[1], device=padded.device)
    rows = [padded[t, order[:n]] for t, n in enumerate(x.batch_sizes.tolist())]
    return _padded(x, torch.dropout(torch.cat(rows), p, True))[0]


def _cell(
    mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        ir, iz, in_ = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    pre = gi + gh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def rnn_rule(call: Call) -> dict[str, Contribution]:  # noqa: C901
    """Per-example statistics of every weight and bias of one recurrent-module call."""
    m = call.module
    args, kwargs = call.args, call.kwargs
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    grads = list(call.grads)
    mask = None
    packed = None
    if isinstance(x, PackedSequence):
        packed = x
        x, lengths = _padded(packed, packed.data)  # [T, B, in], the examples' own order
        mask = torch.arange(x.shape[0]).unsqueeze(1) < lengths  # [T, B]: step t of example b
        mask = mask.to(x.device).unsqueeze(-1)
        if grads[0] is not None:
            grads[0] = _padded(packed, grads[0])[0]
    elif m.batch_first:
        x = x.transpose(0, 1)
    T, B = x.shape[0], x.shape[1]
    D = 2 if m.bidirectional else 1
    L = m.num_layers
    H = m.hidden_size
    P = getattr(m, "proj_size", 0) or 0
    H_out = P if P > 0 else H
    lstm = m.mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(L * D, B, H_out)
        c0 = x.new_zeros(L * D, B, H) if lstm else None
    elif lstm:
        h0, c0 = hx[0].detach(), hx[1].detach()
    else:
        h0, c0 = hx.detach(), None

    # pre-activations (gi per layer/direction over all steps, gh per step), what they multiply
    record: dict[str, tuple[list[Tensor], list[Tensor], bool]] = {}
    dropout = m.dropout if m.training and L > 1 else 0.0
    if dropout > 0 and call.rng is None:
        raise RuntimeError(
            f"{type(m).__name__}: the generator states of a call with dropout between layers "
            "were not recorded (its dropout was raised from 0 after the tracker was attached: "
            "attach the tracker again)"
        )
    redraw = _rng.replay(call.rng, type(m).__name__) if dropout > 0 else contextlib.nullcontext()
    with torch.enable_grad(), redraw:
        layer_in = x.detach()
        h_last, c_last = [], []
        for layer in range(L):
            outs = []
            for direction in range(D):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih = getattr(m, "weight_ih" + sfx).detach()
                w_hh = getattr(m, "weight_hh" + sfx).detach()
                b_ih = getattr(m, "bias_ih" + sfx).detach() if m.bias else None
                b_hh = getattr(m, "bias_hh" + sfx).detach() if m.bias else None
                w_hr = getattr(m, "weight_hr" + sfx).detach() if P > 0 else None
                gi_all = layer_in @ w_ih.T
                if b_ih is not None:
                    gi_all = gi_all + b_ih
                if not gi_all.requires_grad:
                    gi_all.requires_grad_()
                k = layer * D + direction
                h = h0[k].detach().requires_grad_()
                c = c0[k].detach() if lstm else None
                steps = range(T - 1, -1, -1) if direction else range(T)
                ghs, hprev, raws, projs = [], [], [], []
                seq: list[Tensor] = [None] * T  # type: ignore[list-item]
                for t in steps:
                    gh = h @ w_hh.T
                    if b_hh is not None:
                        gh = gh + b_hh
                    ghs.append(gh)
                    hprev.append(h.detach())
                    h_new, c_new = _cell(m.mode, gi_all[t], gh, h, c)
                    if w_hr is not None:
                        raws.append(h_new.detach())
                        h_new = h_new @ w_hr.T
                        projs.append(h_new)
                    if mask is None:
                        h, c = h_new, c_new
                    else:  # past an example's length its state is carried over
                        h = torch.where(mask[t], h_new, h)
                        c = torch.where(mask[t], c_new, c) if lstm else None
                    seq[t] = h
                outs.append(torch.stack(seq))
                h_last.append(h)
                c_last.append(c)
                record["ih" + sfx] = ([gi_all], [layer_in.detach()], True)
                record["hh" + sfx] = (ghs, hprev, False)
                if w_hr is not None:
                    record["hr" + sfx] = (projs, raws, False)
            layer_in = torch.cat(outs, -1) if D > 1 else outs[0]
            if dropout > 0 and layer < L - 1:  # the kernel's draw, from the call's state
                if packed is None:
                    layer_in = torch.dropout(layer_in, dropout, True)
                else:
                    layer_in = _packed_dropout(packed, layer_in, dropout)
        seq_out = layer_in.transpose(0, 1) if m.batch_first and mask is None else layer_in
        outputs = [seq_out, torch.stack(h_last)]
        if lstm:
            outputs.append(torch.stack(c_last))
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None]
        keys = list(record)
        targets = [z for k in keys for z in record[k][0]]
        dz = torch.autograd.grad(
            [o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True
        )
    out: dict[str, Contribution] = {}
    pos = 0
    names = set(call.param_names)
    for key in keys:
        zs, us, stacked = record[key]
        n = len(zs)
        parts = [g if g is not None else torch.zeros_like(z) for g, z in zip(dz[pos : pos + n], zs)]
        pos += n
        dzs = parts[0] if stacked else torch.stack(parts)  # [T, B, rows]
        u = us[0] if stacked else torch.stack(us)  # [T, B, cols]
        kind, sfx = key[:2], key[2:]
        wname = f"weight_{kind}{sfx}"
        if wname in names:
            out[wname] = reduce_per_example(
                wname,
                call,
                getattr(m, wname).shape,
                dzs,
                lambda s, dzs=dzs, u=u: torch.einsum("tbr,tbc->brc", dzs[:, s], u[:, s]),
            )
        bname = f"bias_{kind}{sfx}"
        if bname in names:
            out[bname] = small_per_example(bname, call, dzs.sum(0))
    return out


for _cls in (nn.RNN, nn.LSTM, nn.GRU):
    register(
        _cls,
        Rule(
            rnn_rule,
            batch_size=rnn_batch_size,
            check=check_rnn,
            dropout=lambda module: module.dropout > 0,
        ),
    )
