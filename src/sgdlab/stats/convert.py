"""Make a model's normalisation per-example: ``nn.BatchNorm*d`` replaced by ``nn.GroupNorm``.

BatchNorm in training mode normalises with the statistics of the whole batch, so one example's
loss depends on all the others and per-example gradients, hence the second moments of
batch-size-invariant RMSProp/Adam, are not defined (the tracker refuses it). GroupNorm
normalises each example by itself over groups of channels and trains vision models to similar
accuracy without depending on the batch size (Wu & He 2018, "Group Normalization"), which is the
point of batch-size-invariant hyperparameters anyway. :func:`replace_batchnorm` swaps every
BatchNorm for a GroupNorm over the same channels, keeping the learned per-channel scale and
shift; the running statistics have no counterpart and are dropped, so a pretrained model needs
some training after the swap.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._validation import check_count

__all__ = ["replace_batchnorm"]


def replace_batchnorm(model: nn.Module, num_groups: int = 32) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``model`` (in place) by ``nn.GroupNorm``.

    Each BatchNorm over C channels becomes ``GroupNorm(gcd(num_groups, C), C)`` with the same
    ``eps``, affine when the BatchNorm was, its ``weight`` and ``bias`` copied (same device and
    dtype). Returns ``model`` (a BatchNorm passed as the model itself comes back replaced).

    Example::

        >>> import torch, sgdlab.stats
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64))
        >>> net = sgdlab.stats.replace_batchnorm(net)
        >>> net[1]
        GroupNorm(32, 64, eps=1e-05, affine=True...)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    groups = check_count("num_groups", num_groups)  # an integer >= 1
    return _replace(model, groups, {})


def _replace(model: nn.Module, groups: int, done: dict[int, nn.GroupNorm]) -> nn.Module:
    """:func:`replace_batchnorm`; ``done``: the GroupNorm made for each BatchNorm (by id), so
    that a BatchNorm used in several places becomes one GroupNorm, shared the same way."""
    if isinstance(model, _BatchNorm):
        if id(model) not in done:
            done[id(model)] = _group_norm(model, groups)
        return done[id(model)]
    # every slot, a module held twice included (named_children lists it once)
    for name, child in list(model._modules.items()):
        if isinstance(child, _BatchNorm):
            setattr(model, name, _replace(child, groups, done))
        elif child is not None:
            _replace(child, groups, done)
    return model


def _group_norm(bn: _BatchNorm, num_groups: int) -> nn.GroupNorm:
    if isinstance(bn, torch.nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(
            f"{type(bn).__name__} has not seen an input yet (its number of features is not "
            "known): run one forward pass before replace_batchnorm"
        )
    C = bn.num_features
    ref = bn.weight if bn.affine else bn.running_mean
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    gn = nn.GroupNorm(math.gcd(num_groups, C), C, eps=bn.eps, affine=bn.affine, **kw)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    gn.train(bn.training)
    return gn
