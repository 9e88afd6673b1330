"""Rules for the affine parameters of ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``,
``nn.InstanceNorm*d`` and ``nn.BatchNorm*d`` in evaluation mode.

Each normalises per example, ``y = xhat * weight + bias``, so example b's gradients are
``sum_p d_bp * xhat_bp`` (weight) and ``sum_p d_bp`` (bias), summed over the positions p that
share an affine entry. ``xhat`` is recomputed from the saved input with the module's own
normalisation and no affine part. These per-example gradients are small (``B`` times the
normalised width), so they are formed directly.

InstanceNorm normalises each channel of each example over its positions (with the input's own
statistics in training mode or without running statistics, else with the running statistics,
as BatchNorm in evaluation mode): no coupling between examples.

BatchNorm in training mode normalises with the statistics of the whole batch: the loss of
example b then depends on every other example, per-example gradients are not defined, and the
tracker refuses the module (see :func:`check_batchnorm`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ._base import (
    Call,
    Contribution,
    in_dtype,
    in_param_dtype,
    require_batched,
    small_per_example,
    square_sum,
)
from ._registry import FastPath, Rule, register

__all__ = ["norm_rule", "norm_moments", "check_batchnorm", "check_instancenorm"]


def check_batchnorm(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse BatchNorm when it uses batch statistics (training mode or no running stats)."""
    uses_batch = module.training or not module.track_running_stats
    if uses_batch:
        raise ValueError(
            f"{type(module).__name__} normalises with the mean and variance of the whole batch "
            f"(training={module.training}, track_running_stats={module.track_running_stats}): "
            "no per-example gradient. Use GroupNorm (sgdlab.stats.replace_batchnorm(model)) "
            "or module.eval()"
        )


def check_instancenorm(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse an unbatched input (InstanceNorm accepts ``[C, ...]`` without a batch dimension,
    whose first dimension would be taken for the batch)."""
    x = args[0] if args else kwargs.get("input")
    want = module._get_no_batch_dim() + 1
    if isinstance(x, Tensor) and x.dim() != want:
        raise ValueError(
            f"{type(module).__name__} got an input of shape {tuple(x.shape)}; per-example "
            f"statistics need a batch dimension first (inputs [B, C, ...] with {want} dims)"
        )


def _xhat(module: nn.Module, x: Tensor) -> Tensor:
    """Normalised input without the affine part."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    if isinstance(module, _InstanceNorm) and (module.training or not module.track_running_stats):
        return F.instance_norm(x, eps=module.eps)
    # BatchNorm in eval mode, InstanceNorm with running statistics in eval mode: fixed
    # per-channel statistics.
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = module.running_mean.view(shape)
    var = module.running_var.view(shape)
    return (x - mean) / (var + module.eps).sqrt()


def _per_example(module: nn.Module, t: Tensor, B: int) -> Tensor:
    """Per-example sums over the positions that share an affine entry: ``[B, *shape]`` of
    the affine parameters (a fresh tensor)."""
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        return t.reshape(B, -1, *module.normalized_shape).sum(1)
    return t.reshape(B, t.shape[1], -1).sum(2)  # channel-wise affine


def norm_rule(call: Call) -> dict[str, Contribution]:
    """Per-example statistics of ``weight`` and ``bias`` of one normalisation call."""
    module = call.module
    (d,) = call.grads
    if d is None:
        return {}
    x = in_dtype(call.args[0], module.weight.dtype)
    d = in_dtype(d, module.weight.dtype)
    require_batched(module, x, 2, "inputs [B, ...]")
    B = call.batch_size
    names = set(call.param_names)
    out: dict[str, Contribution] = {}
    if "weight" in names:
        v = _per_example(module, d * _xhat(module, x), B)
        out["weight"] = small_per_example("weight", call, v)
    if "bias" in names:
        out["bias"] = small_per_example("bias", call, _per_example(module, d, B))
    return out


def norm_moments(
    module: nn.Module,
    x: Tensor,
    d: Tensor,
    scale: float,
    memory_budget: int,
    weight: bool,
    bias: bool,
) -> tuple[Tensor, ...]:
    """:func:`norm_rule` for one call of a per-example normalisation (LayerNorm, RMSNorm,
    GroupNorm) with little host work: ``scale * sum_b v_b^2`` of the per-example weight and
    bias gradients (those requested, in this order), with the rule's kernels. Its per-example
    tensors are small, so ``memory_budget`` never sends it to the general rule."""
    x, d = in_param_dtype(module, x, d)
    B = d.shape[0]

    def moment(t: Tensor) -> Tensor:  # scale * sum_b v_b^2, v the per-example sums of t
        v = _per_example(module, t, B)
        return square_sum(v.view(B, -1), scale).view(v.shape[1:])

    out: list[Tensor] = []
    if weight:
        out.append(moment(d * _xhat(module, x)))
    if bias:
        out.append(moment(d))
    return tuple(out)


_FAST = FastPath(norm_moments, more=norm_moments)  # per-example norms on [B, ...]
for _cls in (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm):
    register(_cls, Rule(norm_rule, fast=_FAST))
register(_InstanceNorm, Rule(norm_rule, check=check_instancenorm))
for _cls in (_BatchNorm, nn.SyncBatchNorm):  # SyncBatchNorm: its own forward
    register(_cls, Rule(norm_rule, check=check_batchnorm))
