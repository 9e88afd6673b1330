"""The attribute that carries the statistic, and its lifetime: ``p.grad_second_moment`` lives
as long as the gradient it belongs to (cleared with it, :func:`zeroed`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ATTRIBUTE", "clear", "cleared_since", "zeroed"]

# p.grad_second_moment = (1/N) sum_b g_b * g_b: the one name of the statistic on a parameter
ATTRIBUTE = "grad_second_moment"


def clear(params: dict[int, nn.Parameter]) -> None:
    """Remove the statistic of each parameter (its gradient was cleared)."""
    for p in params.values():
        if getattr(p, ATTRIBUTE, None) is not None:
            setattr(p, ATTRIBUTE, None)


def zeroed(written: list[tuple[nn.Parameter, Tensor]]) -> list[nn.Parameter]:
    """The parameters whose gradient is all zeros (``zero_grad(set_to_none=False)``): one
    multi-tensor max-norm and one host read per device, instead of a synchronising ``any()``
    per parameter."""
    by_device: dict[torch.device, list[tuple[nn.Parameter, Tensor]]] = {}
    out = []
    for p, g in written:
        if g.layout != torch.strided:  # sparse gradients: one check each
            if not bool(g.any()):
                out.append(p)
        else:
            by_device.setdefault(g.device, []).append((p, g))
    for items in by_device.values():
        maxima = torch._foreach_norm([g for _, g in items], math.inf)
        nonzero = torch.stack(maxima).ne(0).tolist()  # NaN and inf count as written
        out += [p for (p, _), keep in zip(items, nonzero, strict=True) if not keep]
    return out


def cleared_since(
    plist: list[tuple[int, nn.Parameter]], versions: dict[int, int], unknown: set[int]
) -> dict[int, nn.Parameter]:
    """The parameters whose gradient was cleared since the last backward pass wrote their
    statistic: ``None``, or zeroed in place (its version moved since, and it is all zeros; a
    parameter in ``unknown``, whose gradient a failed pass may have written to, is checked
    whatever its version)."""
    cleared: dict[int, nn.Parameter] = {}
    written: list[tuple[nn.Parameter, Tensor]] = []  # since the last pass: zeroed?
    for pid, p in plist:
        g = p.grad
        if g is None:
            cleared[pid] = p
        else:
            v = versions.get(pid)
            if (v is not None and g._version != v) or (unknown and pid in unknown):
                written.append((p, g))
    if written:
        for p in zeroed(written):
            cleared[id(p)] = p
    return cleared
