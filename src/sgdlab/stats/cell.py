"""Rule for ``nn.RNNCell``, ``nn.LSTMCell`` and ``nn.GRUCell``: one step of a recurrence,
usually called once per time step of a loop written by hand (decoders, custom recurrences).

One call computes the pre-activations ``gi = W_ih x + b_ih`` and ``gh = W_hh h + b_hh`` and the
new state from them. Example b's gradients are outer products,

    dW_ih = dgi_b x_b^T,   db_ih = dgi_b,   dW_hh = dgh_b h_b^T,   db_hh = dgh_b,

so, as for ``nn.Linear`` on ``[B, in]``, a call alone gives ``sum_b (dgi_b x_b^T)^2 =
(dgi^2)^T (x^2)`` with one matrix product and no per-example tensor. The cell's kernel does not
expose ``dgi`` and ``dgh``: the rule recomputes the step from the saved input and state in plain
tensor operations (the same equations as :mod:`sgdlab.stats.recurrent`) and asks autograd for
the gradients of the two pre-activations given the gradients of the outputs. A cell called at
every step of a loop uses its parameters many times in one backward pass; each call then hands
the tracker its factors ``(dgi, x)`` and ``(dgh, h)``, and the tracker forms each example's
gradient summed over the calls with one batched product (:func:`~sgdlab.stats._base.outer_moments`).

Reference: the per-example outer-product form of Goodfellow (2015) "Efficient per-example
gradient computations", applied to the cell's two affine maps
(:func:`~sgdlab.stats.linear.affine_moments`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import Call, Contribution
from ._registry import Rule, register
from .linear import affine_moments
from .recurrent import _cell

__all__ = ["cell_rule", "check_cell"]


def check_cell(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse an unbatched input (a cell accepts ``[in]``, whose size would be taken for the
    batch)."""
    x = args[0] if args else kwargs.get("input")
    if isinstance(x, Tensor) and x.dim() != 2:
        raise ValueError(
            f"{type(module).__name__} got an input of shape {tuple(x.shape)}; per-example "
            "statistics need a batched input [B, input_size]"
        )


def _mode(module: nn.Module) -> str:
    if isinstance(module, nn.LSTMCell):
        return "LSTM"
    if isinstance(module, nn.GRUCell):
        return "GRU"
    return "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"


def cell_rule(call: Call) -> dict[str, Contribution]:
    """Per-example statistics of ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` of one
    cell call."""
    m = call.module
    dtype = m.weight_ih.dtype
    # the tracker passes keyword inputs by position (input, hx)
    x = call.args[0].detach().to(dtype)
    hx = call.args[1] if len(call.args) > 1 else None
    mode = _mode(m)
    B, H = x.shape[0], m.hidden_size
    if hx is None:
        h = x.new_zeros(B, H)
        c = x.new_zeros(B, H) if mode == "LSTM" else None
    elif mode == "LSTM":
        h, c = hx[0].detach().to(dtype), hx[1].detach().to(dtype)
    else:
        h, c = hx.detach().to(dtype), None
    with torch.enable_grad():
        gi = F.linear(x, m.weight_ih.detach(), None if m.bias_ih is None else m.bias_ih.detach())
        gh = F.linear(h, m.weight_hh.detach(), None if m.bias_hh is None else m.bias_hh.detach())
        gi.requires_grad_()
        gh.requires_grad_()
        h_new, c_new = _cell(mode, gi, gh, h, c)
        outputs = [h_new, c_new] if mode == "LSTM" else [h_new]
        pairs = [
            (o, g.to(dtype)) for o, g in zip(outputs, call.grads, strict=True) if g is not None
        ]
        if not pairs:
            return {}
        dgi, dgh = torch.autograd.grad(
            [o for o, _ in pairs], [gi, gh], [g for _, g in pairs], allow_unused=True
        )
    dgi = torch.zeros_like(gi) if dgi is None else dgi
    dgh = torch.zeros_like(gh) if dgh is None else dgh
    out: dict[str, Contribution] = {}
    names = call.param_names
    for kind, dz, u in (("ih", dgi, x), ("hh", dgh, h)):
        w, b = f"weight_{kind}", f"bias_{kind}"
        out.update(
            affine_moments(call, dz, u, w if w in names else None, b if b in names else None)
        )
    return out


for _cls in (nn.RNNCell, nn.LSTMCell, nn.GRUCell):
    register(_cls, Rule(cell_rule, check=check_cell))
