"""Gradient-norm clipping that keeps the per-example statistics consistent with the gradient.

Clipping rescales the batch gradient, ``G <- c G`` with ``c = min(1, max_norm / (|G| + 1e-6))``
(torch's ``clip_grad_norm_``), which is the gradient of the loss scaled by ``c``. The per-example
gradients of that loss are ``c g_b``, so the statistics that go with the clipped gradient are
``c^2 (1/B) sum_b g_b^2``. ``torch.nn.utils.clip_grad_norm_`` cannot reach
``p.grad_second_moment``; after it, a per-example RMSProp/Adam step divides a clipped gradient by
an unclipped second moment (a step ``c`` times smaller than Adam's with clipping, which feeds
``c^2 g^2`` to its second moment), and the noise meter's ``|G|^2`` and ``tr(Sigma)`` estimates
mix a clipped and an unclipped quantity. :func:`clip_grad_norm_` scales both.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .._validation import check_positive
from ._attribute import ATTRIBUTE

__all__ = ["clip_grad_norm_"]


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also multiplies each parameter's
    ``grad_second_moment`` by the square of the clipping factor.

    Same arguments and return value (the total norm of the gradients before clipping) as
    torch's; the factor stays on the device (no host synchronisation). Per-example squared
    norms kept by the tracker (``per_example_norms=True``) are left as measured.
    """
    check_positive("max_norm", max_norm)
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach)
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's clipping factor
    for p in params:
        s = getattr(p, ATTRIBUTE, None)
        if s is not None and p.grad is not None:
            s.mul_(factor.to(s.device, s.dtype).square())
    return total
