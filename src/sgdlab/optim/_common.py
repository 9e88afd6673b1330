"""Small helpers every path of sgdlab's optimizers uses (a leaf module: it imports no other
part of :mod:`sgdlab.optim`)."""

from __future__ import annotations

import torch

__all__ = ["group_indices", "scalar_dtype"]


def scalar_dtype() -> torch.dtype:
    """The dtype torch.optim uses for ``state['step']`` (float64 under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def group_indices(params: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by (device, dtype), for the foreach kernels."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    return list(groups.values())
