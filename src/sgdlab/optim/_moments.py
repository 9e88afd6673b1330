r"""Second moments and denominators shared by RMSProp and Adam.

The second-moment average ``s`` tracks one of two statistics (``second_moment``):

* ``"batch"``: the square of the batch-mean gradient, ``g_hat[i]^2``, as torch does. Its
  expectation ``g[i]^2 + sigma[i]^2 / B`` depends on the batch size (lecture, "Scaling eta with
  batch size for RMSProp").
* ``"per_example"``: the batch mean of per-example squared gradients,
  ``(1/B) sum_b g_{b,i}^2``, with expectation ``g[i]^2 + sigma[i]^2`` at every ``B``: the
  lecture's batch-size-invariant RMSProp. It is read from ``p.grad_second_moment``, which the
  augmented backward (:func:`sgdlab.stats.track`) attaches.

With coupled (L2) weight decay every per-example gradient gains ``wd * p``, and with
``maximize`` it changes sign, so the per-example statistic of ``e_b = s g_b + wd p``
(``s = -1`` when maximizing) is ``mean_b g_b^2 + 2 s wd p g_hat + wd^2 p^2``.

The denominator divides by ``s_hat^power`` (``power = 1/2``: by sigma, as RMSProp and Adam do;
``power = 1``: by sigma^2, the lecture's "theoretically motivated" variant) with ``eps`` placed
``"outside"`` (torch: ``s_hat^p + eps``) or ``"inside"`` (the lecture: ``(s_hat + eps)^p``;
REFERENCE.md erratum 8). ``s_hat = s / c2`` with ``c2`` Adam's bias correction (1 without).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "as_real",
    "check_power",
    "power_form",
    "flat_denominator",
    "flat_per_example",
    "EPS_PLACEMENTS",
    "SECOND_MOMENTS",
    "missing_second_moment_error",
    "second_moment_tensors",
    "check_second_moments",
    "per_example_second_moment",
    "denominator",
    "denominators_foreach",
]

EPS_PLACEMENTS = ("outside", "inside")
SECOND_MOMENTS = ("batch", "per_example")


def check_power(power: Any) -> float:
    """``power`` as a float in (0, 1] (0.5: divide by sigma; 1: divide by sigma^2)."""
    if isinstance(power, bool) or not isinstance(power, int | float) or not 0 < power <= 1:
        raise ValueError(
            f"power must be a number in (0, 1] (0.5: sigma, 1: sigma^2), got {power!r}"
        )
    return float(power)


def power_form(power: float) -> str:
    """The structural form of ``power`` in a fused kernel: ``"half"``, ``"one"`` or
    ``"general"`` (the value then read from the scalar vector)."""
    return "half" if power == 0.5 else "one" if power == 1.0 else "general"


def flat_denominator(
    s: torch.Tensor,
    eps: torch.Tensor,
    power: torch.Tensor,
    c2: torch.Tensor | None,
    sqrt_c2: torch.Tensor | None,
    *,
    form: str,
    placement: str,
) -> torch.Tensor:
    """:func:`denominator` inside a fused kernel (0-d tensor scalars, same operations in the
    same order); ``form`` as :func:`power_form`, ``c2``/``sqrt_c2`` Adam's bias correction
    (``None``: uncorrected)."""
    if form == "half" and placement == "outside":
        d = s.sqrt()
        if sqrt_c2 is not None:
            d = d / sqrt_c2
        return d + eps
    shat = s / c2 if c2 is not None else s
    if placement == "inside":
        shat = shat + eps
        if form == "half":
            return shat.sqrt()
        return shat if form == "one" else shat.pow(power)
    if form == "general":
        shat = shat.pow(power)
    return shat + eps


def flat_per_example(
    m2: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    two_sign_wd: torch.Tensor,
    wd2: torch.Tensor,
    weight_decay: bool,
) -> torch.Tensor:
    """:func:`per_example_second_moment` inside a fused kernel: ``m2 + 2 s wd p g + wd^2 p^2``
    with the raw gradient ``g`` (``m2`` alone without weight decay)."""
    if not weight_decay:
        return m2
    return m2 + two_sign_wd * x * grad + wd2 * x * x


def as_real(tensors: list) -> list:
    """Complex tensors as real views (``torch.view_as_real``: a trailing pair of real and
    imaginary parts), others unchanged, ``None`` kept. RMSProp and Adam step a complex
    parameter as the pair of reals it is, as torch.optim does: the second moment of ``g`` is
    ``(Re g)^2`` and ``(Im g)^2`` per part, not ``g*g`` (complex) and not ``|g|^2``."""
    return [torch.view_as_real(t) if t is not None and t.is_complex() else t for t in tensors]


def missing_second_moment_error(p: torch.Tensor) -> ValueError:
    return ValueError(
        f"second_moment='per_example' needs p.grad_second_moment; a parameter of shape "
        f"{tuple(p.shape)} has none: call sgdlab.stats.track(model) before the forward pass "
        "(after unfreezing a parameter, attach it again), or use second_moment='batch'"
    )


def second_moment_tensors(group: dict, p: torch.Tensor) -> list[torch.Tensor]:
    """``[p.grad_second_moment]`` when ``group`` uses per-example second moments and ``p`` has
    one (for the non-finite check), else ``[]``."""
    if group.get("second_moment") != "per_example":
        return []
    m2 = getattr(p, "grad_second_moment", None)
    return [m2] if m2 is not None else []


def check_second_moments(group: dict) -> None:
    """With ``second_moment="per_example"``, every parameter with a gradient must carry a
    ``grad_second_moment`` of its own shape (checked before any parameter changes)."""
    if group.get("second_moment") != "per_example":
        return
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.is_complex():
            raise ValueError(
                f"second_moment='per_example' takes real parameters; one of shape "
                f"{tuple(p.shape)} is {p.dtype} (use second_moment='batch')"
            )
        m2 = getattr(p, "grad_second_moment", None)
        if m2 is None:
            raise missing_second_moment_error(p)
        if m2.shape != p.shape:
            raise ValueError(
                f"p.grad_second_moment has shape {tuple(m2.shape)}, expected the parameter's "
                f"shape {tuple(p.shape)}"
            )


def per_example_second_moment(
    p: torch.Tensor, grad: torch.Tensor, weight_decay: float, maximize: bool
) -> torch.Tensor:
    """``mean_b (s g_b + wd p)^2`` from ``p.grad_second_moment`` (see the module docstring)."""
    m2 = getattr(p, "grad_second_moment", None)
    if m2 is None:
        raise missing_second_moment_error(p)
    if weight_decay == 0:
        return m2
    sign = -1.0 if maximize else 1.0
    return m2 + (2.0 * sign * weight_decay) * p * grad + (weight_decay**2) * p * p


def denominator(
    s: torch.Tensor,
    *,
    eps: float,
    power: float,
    placement: str,
    bias_correction: float = 1.0,
) -> torch.Tensor:
    """``(s / c)^p + eps`` (outside) or ``(s / c + eps)^p`` (inside), as a new tensor.

    For ``p = 1/2``, outside, this is computed as ``sqrt(s) / sqrt(c) + eps``, the exact
    sequence of operations of torch.optim.Adam / RMSprop.
    """
    if power == 0.5 and placement == "outside":
        d = s.sqrt()
        if bias_correction != 1.0:
            d = d / math.sqrt(bias_correction)
        return d.add_(eps)
    shat = s / bias_correction if bias_correction != 1.0 else s.clone()
    if placement == "inside":
        shat.add_(eps)
        return shat.sqrt_() if power == 0.5 else shat.pow_(power)
    d = shat.pow_(power) if power != 1.0 else shat
    return d.add_(eps)


def denominators_foreach(
    s: list[torch.Tensor] | tuple[torch.Tensor, ...],
    *,
    eps: float,
    power: float,
    placement: str,
    bias_corrections: list[float] | None = None,
) -> list[torch.Tensor]:
    """:func:`denominator` for a list of tensors with per-tensor bias corrections."""
    if power == 0.5 and placement == "outside":
        d = list(torch._foreach_sqrt(s))
        if bias_corrections is not None:
            torch._foreach_div_(d, [math.sqrt(c) for c in bias_corrections])
        torch._foreach_add_(d, eps)
        return d
    if bias_corrections is not None:
        shat = list(torch._foreach_div(s, bias_corrections))
    else:
        shat = [t.clone() for t in s]
    if placement == "inside":
        torch._foreach_add_(shat, eps)
        if power == 0.5:
            torch._foreach_sqrt_(shat)
        else:
            torch._foreach_pow_(shat, power)
        return shat
    if power != 1.0:
        torch._foreach_pow_(shat, power)
    torch._foreach_add_(shat, eps)
    return shat
