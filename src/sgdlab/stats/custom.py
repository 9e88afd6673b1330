"""Rules for your own layer types: :func:`register_rule`.

A module type without a dedicated rule takes the ``torch.func`` fallback, which is exact but
reruns the module per example. Where example b's parameter gradient has a closed form in the
module's inputs and output gradients (as ``d_b a_b^T`` for a linear map), register it:

    >>> import torch, sgdlab.stats
    >>> class Scale(torch.nn.Module):                 # y = x * s, one s per feature
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.s = torch.nn.Parameter(torch.ones(n))
    ...     def forward(self, x):
    ...         return x * self.s
    >>> def scale_rule(module, inputs, grad_outputs):
    ...     (x,), (d,) = inputs, grad_outputs         # [n, ..., features], n examples
    ...     g = (x * d).reshape(len(x), -1, x.shape[-1]).sum(1)  # summed over positions
    ...     return {"s": g}                           # per-example gradients [n, features]
    >>> handle = sgdlab.stats.register_rule(Scale, scale_rule)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), Scale(4))
    >>> with sgdlab.stats.track(model):
    ...     model(torch.randn(8, 3)).square().mean().backward()
    ...     print(model[1].s.grad_second_moment.shape)
    torch.Size([4])
    >>> handle.remove()

The function gets the module, its positional inputs and the gradients of its outputs (those
requiring grad, in the order of ``torch.utils._pytree.tree_leaves(output)``; ``None`` where one
got no gradient), for a chunk of the batch: every tensor whose first dimension is the batch size
is sliced to the chunk, others are passed whole, and chunks are sized so that the per-example
gradients fit the tracker's ``memory_budget``. It returns, for each of the module's own
parameters (``named_parameters(recurse=False)`` that require grad), the per-example gradients
of the *summed* loss, shape ``[n, *param.shape]``; the tracker squares and sums them, applies
the loss reduction, adds parameters used several times per example before squaring and forms the
per-example norms. A registered rule takes precedence over sgdlab's own for its type and
subclasses that keep its ``forward``; it applies to trackers attached after registration.
(The same contract as Opacus's ``register_grad_sampler``.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from ._base import Call, ChunkSums, Contribution, chunk_size
from ._registry import Rule, RuleHandle, register

__all__ = ["RuleHandle", "register_rule"]

PerExample = Callable[[nn.Module, tuple[Any, ...], tuple[Tensor | None, ...]], Mapping[str, Tensor]]


def register_rule(module_type: type, per_example: PerExample) -> RuleHandle:
    """Compute the statistics of ``module_type``'s parameters with ``per_example(module,
    inputs, grad_outputs) -> {name: [n, *param.shape]}`` (see the module docstring); a
    :class:`~sgdlab.stats.Rule` with this closed form, through :func:`sgdlab.stats.register`."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of torch.nn.Module, got {module_type!r}")
    if not callable(per_example):
        raise TypeError(f"per_example must be callable, got {type(per_example).__name__}")
    return register(module_type, Rule(functools.partial(_compute, per_example)))


def _compute(per_example: PerExample, call: Call) -> dict[str, Contribution]:
    m = call.module
    B = call.batch_size
    params = dict(m.named_parameters(recurse=False))
    names = call.param_names
    live = [g for g in call.grads if g is not None]
    if not live:
        return {}
    numel = sum(params[n].numel() for n in names)
    n = chunk_size(B, 2 * numel * params[names[0]].element_size(), call.memory_budget)

    def cut(t: Any, s: slice) -> Any:
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B:
            return t[s]
        return t

    sums = ChunkSums(call)
    for i in range(0, B, n):
        s = slice(i, min(B, i + n))
        got = per_example(
            m,
            tuple(cut(a, s) for a in call.args),
            tuple(None if g is None else cut(g, s) for g in call.grads),
        )
        if isinstance(got, Mapping):
            unknown = sorted(str(k) for k in got if k not in params)
            if unknown:
                raise ValueError(
                    f"the rule registered for {type(m).__name__} returned {unknown}, which are "
                    f"not parameters of the module (its parameters: {sorted(params)})"
                )
        for nm in names:
            v = _checked(m, got, nm, (s.stop - s.start, *params[nm].shape))
            sums.add(nm, v.to(params[nm].dtype))
    return sums.contributions({nm: params[nm].shape for nm in names})


def _checked(module: nn.Module, got: Any, name: str, shape: tuple[int, ...]) -> Tensor:
    kind = type(module).__name__
    if not isinstance(got, Mapping):
        raise TypeError(
            f"the rule registered for {kind} must return a mapping from parameter names to "
            f"per-example gradients, got {type(got).__name__}"
        )
    v = got.get(name)
    if v is None:
        raise ValueError(
            f"the rule registered for {kind} returned no per-example gradient for parameter "
            f"{name!r} (it returned {sorted(got)})"
        )
    if not isinstance(v, Tensor) or not v.is_floating_point():
        what = type(v).__name__ if not isinstance(v, Tensor) else f"a {v.dtype} tensor"
        raise TypeError(
            f"the rule registered for {kind} returned {what} for parameter {name!r}; expected "
            "a real floating-point torch.Tensor"
        )
    if tuple(v.shape) != shape:
        raise ValueError(
            f"the rule registered for {kind} returned shape {tuple(v.shape)} for parameter "
            f"{name!r}; expected {shape} (examples in the chunk, then the parameter's shape)"
        )
    return v
