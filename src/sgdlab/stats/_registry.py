"""Which rule computes the per-example statistics of which module.

A module gets a dedicated rule when it is an instance of a supported layer type *and* keeps that
type's ``forward`` (a subclass that overrides ``forward`` may compute something else, so it takes
the fallback) *and* is not parametrized (``torch.nn.utils.parametrize``: its tensors are computed
from other parameters, whose per-example gradients the fallback differentiates through the
parametrization). Every other module that owns parameters takes the ``torch.func`` fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from ._base import Call, Contribution
from .attention import attention_rule, check_attention
from .bilinear import bilinear_rule
from .cell import cell_rule, check_cell
from .conv import conv_rule
from .conv_transpose import conv_transpose_rule
from .embedding import check_embedding, embedding_rule
from .embedding_bag import check_embedding_bag, embedding_bag_batch_size, embedding_bag_rule
from .fallback import check_fallback, fallback_batch_size, fallback_params, fallback_rule
from .linear import linear_rule
from .norm import check_batchnorm, check_instancenorm, norm_rule
from .prelu import prelu_rule
from .recurrent import check_rnn, rnn_batch_size, rnn_rule
from .transposed_linear import is_hf_conv1d, transposed_linear_rule

__all__ = ["Rule", "rule_for"]


def _first_dim(module: nn.Module, args: tuple, kwargs: dict) -> int:
    x = args[0] if args else next(iter(kwargs.values()))
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError(
            f"{type(module).__name__} needs a batched tensor input with the batch first, "
            f"got {type(x).__name__}"
        )
    return int(x.shape[0])


def _direct(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def _no_check(module: nn.Module, args: tuple, kwargs: dict) -> None:
    return None


@dataclass(frozen=True)
class Rule:
    """A layer rule: how to read the batch size, what to refuse, how to compute."""

    name: str
    compute: Callable[[Call], dict[str, Contribution]]
    batch_size: Callable[[nn.Module, tuple, dict], int] = _first_dim
    check: Callable[[nn.Module, tuple, dict], None] = _no_check
    params: Callable[[nn.Module], list[tuple[str, nn.Parameter]]] = _direct
    is_fallback: bool = False


_TABLE: list[tuple[type, Rule]] = [
    (nn.Linear, Rule("linear", linear_rule)),
    (nn.Conv1d, Rule("conv", conv_rule)),
    (nn.Conv2d, Rule("conv", conv_rule)),
    (nn.Conv3d, Rule("conv", conv_rule)),
    (nn.ConvTranspose1d, Rule("conv_transpose", conv_transpose_rule)),
    (nn.ConvTranspose2d, Rule("conv_transpose", conv_transpose_rule)),
    (nn.ConvTranspose3d, Rule("conv_transpose", conv_transpose_rule)),
    (nn.Embedding, Rule("embedding", embedding_rule, check=check_embedding)),
    (
        nn.EmbeddingBag,
        Rule("embedding_bag", embedding_bag_rule, batch_size=embedding_bag_batch_size,
             check=check_embedding_bag),
    ),
    (nn.LayerNorm, Rule("norm", norm_rule)),
    (nn.GroupNorm, Rule("norm", norm_rule)),
    (nn.RMSNorm, Rule("norm", norm_rule)),
    (_InstanceNorm, Rule("norm", norm_rule, check=check_instancenorm)),
    (_BatchNorm, Rule("norm", norm_rule, check=check_batchnorm)),
    (nn.SyncBatchNorm, Rule("norm", norm_rule, check=check_batchnorm)),  # its own forward
    (
        nn.MultiheadAttention,
        Rule(
            "attention",
            attention_rule,
            batch_size=fallback_batch_size,
            check=check_attention,
            params=fallback_params,
        ),
    ),
    (nn.RNN, Rule("recurrent", rnn_rule, batch_size=rnn_batch_size, check=check_rnn)),
    (nn.LSTM, Rule("recurrent", rnn_rule, batch_size=rnn_batch_size, check=check_rnn)),
    (nn.GRU, Rule("recurrent", rnn_rule, batch_size=rnn_batch_size, check=check_rnn)),
    (nn.Bilinear, Rule("bilinear", bilinear_rule)),
    (nn.PReLU, Rule("prelu", prelu_rule)),
    (nn.RNNCell, Rule("cell", cell_rule, check=check_cell)),
    (nn.LSTMCell, Rule("cell", cell_rule, check=check_cell)),
    (nn.GRUCell, Rule("cell", cell_rule, check=check_cell)),
]

FALLBACK = Rule(
    "fallback",
    fallback_rule,
    batch_size=fallback_batch_size,
    check=check_fallback,
    params=fallback_params,
    is_fallback=True,
)


def _base_forward(cls: type) -> Any:
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return vars(klass)["forward"]
    return None


# rules registered by users (:func:`sgdlab.stats.register_rule`), by module type
_CUSTOM: dict[type, Rule] = {}

TRANSPOSED_LINEAR = Rule("transposed_linear", transposed_linear_rule)


def rule_for(module: nn.Module) -> Rule:
    """The rule registered for ``module``'s type, else its dedicated rule, else the fallback."""
    if parametrize.is_parametrized(module):
        return FALLBACK
    for cls in type(module).__mro__:
        rule = _CUSTOM.get(cls)
        if rule is not None and _base_forward(type(module)) is _base_forward(cls):
            return rule
    if is_hf_conv1d(module) and _base_forward(type(module)).__qualname__ == "Conv1D.forward":
        return TRANSPOSED_LINEAR
    for cls, rule in _TABLE:
        if isinstance(module, cls) and _base_forward(type(module)) is _base_forward(cls):
            return rule
    return FALLBACK
