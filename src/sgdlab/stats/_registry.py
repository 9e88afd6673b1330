"""Which rule computes the per-example statistics of which module: :class:`Rule`,
:func:`register`, :func:`rule_for`.

Each layer file declares its :class:`Rule` and registers it for its module types through
:func:`register`, the one registration point (users' closed forms go through it too, via
:func:`sgdlab.stats.register_rule`); the tracker reads only the rule. A module gets the rule
registered for the nearest class of its type's MRO *that it keeps the ``forward`` of* (a
subclass that overrides ``forward`` may compute something else, so it takes the fallback),
unless it is parametrized (``torch.nn.utils.parametrize``: its tensors are computed from other
parameters, whose per-example gradients the fallback differentiates through the
parametrization). Every other module that owns parameters takes the rule registered for
``nn.Module``: the ``torch.func`` fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._base import Call, Contribution

__all__ = ["FastPath", "Rule", "RuleHandle", "register", "rule_for"]


def first_dim(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """The batch size of a call whose input puts the batch first (the common layout)."""
    x = args[0] if args else next(iter(kwargs.values()))
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError(
            f"{type(module).__name__} needs a batched tensor input with the batch first, "
            f"got {type(x).__name__}"
        )
    return int(x.shape[0])


def no_check(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """No call is refused."""
    return None


def own_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's own trainable parameters (not its submodules')."""
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


@dataclass(frozen=True)
class FastPath:
    """A short path for calls on one tensor: the rule's kernels without the general path's
    bookkeeping, computed as the output gradient ``d`` arrives or, for small calls, at the end
    of the pass.

    ``moments(module, x, d, scale, memory_budget, has_weight, has_bias)`` returns
    ``scale * sum_b v_b^2`` for the tracked ones of ``weight`` and ``bias`` (in this order),
    or ``None`` to hand the call to the rule (too large for one chunk). It takes calls on an
    input of ``ndim(module)`` dimensions; ``more``, if given, those on more dimensions
    (``[B, T..., in]``). With ``lane``, the ``ndim`` calls of the pass wait for its end and
    are computed together by ``lane(calls, scale)`` (``calls``: ``(has_weight, has_bias,
    dtype, x, d)`` each; one list of moments per call), fewer kernels where a step is bound
    by launches. ``flat_grad``: ``more`` takes the output gradient of a call whose output
    reshapes a product as that product's (``[B * T, out]``). ``when(module, tracker)``: whether
    a tracker takes the path (its options: ``conv_strategy``)."""

    moments: Callable[..., Any] | None = None
    ndim: Callable[[nn.Module], int] = lambda module: 2
    more: Callable[..., Any] | None = None
    lane: Callable[..., Any] | None = None
    flat_grad: bool = False
    when: Callable[[nn.Module, Any], bool] = lambda module, tracker: True


@dataclass(frozen=True)
class Rule:
    """A layer rule: what it computes, how to read the batch size, what to refuse.

    ``compute(call)`` returns the :class:`~sgdlab.stats._base.Contribution` of each parameter
    (the general path). ``batch_size`` and ``check`` read and check a call's inputs (their
    defaults: one batched input, batch first, nothing refused: the layout a :class:`FastPath`
    needs). ``params`` names the parameters the rule is responsible for; with
    ``owns_submodules`` those of its submodules too, which are then not tracked on their own
    (``nn.MultiheadAttention``'s ``out_proj``). ``dropout(module)``: the rule reruns the
    dropout masks the call drew (the tracker records the generator states around it).
    ``is_fallback``: the rule reruns the whole module per example (its buffers must not change
    in the call, its outputs are kept for a check of the rerun). ``applies(module)``: a
    further condition on the module (a class known by name only). ``fast``: a short path."""

    compute: Callable[[Call], dict[str, Contribution]]
    batch_size: Callable[[nn.Module, tuple, dict], int] = first_dim
    check: Callable[[nn.Module, tuple, dict], None] = no_check
    params: Callable[[nn.Module], list[tuple[str, nn.Parameter]]] = own_params
    owns_submodules: bool = False
    dropout: Callable[[nn.Module], bool] | None = None
    is_fallback: bool = False
    applies: Callable[[nn.Module], bool] | None = None
    fast: FastPath | None = None

    @property
    def plain(self) -> bool:
        """Calls on one tensor need no check, their batch size is its first dimension."""
        return self.check is no_check and self.batch_size is first_dim


# every rule registered for a key, oldest first; the newest still registered is used. A key is
# a type, or ``"package.Class"`` for a class of a package sgdlab never imports
_STACKS: dict[type | str, list[Rule]] = {}


class RuleHandle:
    """Returned by :func:`register`; :meth:`remove` unregisters the rule, in any order: the
    newest rule still registered for the type is used (none: the fallback)."""

    def __init__(self, module_type: type | str, rule: Rule) -> None:
        self.module_type = module_type
        self.rule = rule

    def remove(self) -> None:
        stack = _STACKS.get(self.module_type, [])
        stack[:] = [r for r in stack if r is not self.rule]
        if not stack:
            _STACKS.pop(self.module_type, None)


def register(module_type: type | str, rule: Rule) -> RuleHandle:
    """Compute the statistics of ``module_type``'s modules (and of its subclasses that keep
    its ``forward``) with ``rule``; a rule for ``nn.Module`` is the fallback. ``module_type``
    may be ``"package.Class"``: class ``Class`` of any module of ``package``, not imported."""
    named = isinstance(module_type, str) and module_type.count(".") == 1
    if not (named or isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of torch.nn.Module, got {module_type!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a sgdlab.stats.Rule, got {type(rule).__name__}")
    _STACKS.setdefault(module_type, []).append(rule)
    return RuleHandle(module_type, rule)


def _base_forward(cls: type) -> Any:
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return vars(klass)["forward"]
    return None


def _registered(cls: type) -> Rule | None:
    stack = _STACKS.get(cls)
    if stack is None:
        package = cls.__module__.partition(".")[0]
        stack = _STACKS.get(f"{package}.{cls.__name__}")
    return stack[-1] if stack else None


def rule_for(module: nn.Module) -> Rule:
    """The rule registered for the nearest class of ``module``'s type whose ``forward`` it
    keeps, else the fallback (the rule registered for ``nn.Module``)."""
    fallback = _STACKS[nn.Module][-1]
    if parametrize.is_parametrized(module):
        return fallback
    forward = _base_forward(type(module))
    for cls in type(module).__mro__[:-2]:  # not nn.Module, object
        rule = _registered(cls)
        if (
            rule is not None
            and forward is _base_forward(cls)
            and (rule.applies is None or rule.applies(module))
        ):
            return rule
    return fallback
