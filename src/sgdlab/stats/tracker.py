"""The augmented backward: per-example second moments during ``loss.backward()``.

Attach with :func:`track`. Each tracked module records its inputs when called (a forward hook)
and, when the gradient with respect to its output arrives during backward (a pre-hook on the
autograd node that produced the output), its layer rule turns both into per-example statistics
of the module's parameters. Calls of ``nn.Linear`` on ``[B, in]`` inputs (MLPs, heads) are
checked when their output gradient arrives but computed together later, at the end of the pass
or once the tensors they hold outgrow ``memory_budget``: the squares of all of them are one
multi-tensor kernel, which matters where a step is bound by kernel launches (small layers on a
GPU); on a GPU with Triton they are one fused kernel for up to four layers
(:mod:`sgdlab.stats._fused_linear`, compiled on the first backward pass that uses it).
Calls of ``nn.Linear`` on ``[B, T..., in]`` and of convolutions whose per-example gradients fit
``memory_budget`` at once, and calls of LayerNorm, RMSNorm and GroupNorm, take a short path
(:func:`~sgdlab.stats.linear.linear_seq_moments`, :func:`~sgdlab.stats.conv.conv_moments`,
:func:`~sgdlab.stats.norm.norm_moments`): the rule's kernels without its per-call bookkeeping,
computed as the gradient arrives or, for small calls (:data:`DEFER_BYTES`), with the Linear
lane.
At the end of each backward pass (an autograd-engine callback) every tracked parameter
``p`` holds

    p.grad_second_moment = (1/N) sum_b g_b * g_b        (same shape as p)

where ``g_b`` is the gradient of example b's loss ``l_b`` and N the batch size.

Loss reduction. ``reduction="mean"`` (default) assumes ``loss = (1/N) sum_b l_b``;
``reduction="sum"`` assumes ``loss = sum_b l_b``. N is the batch dimension of the module inputs
unless ``batch_size`` is given (see accumulation).

Accumulation over micro-batches. ``grad_second_moment`` accumulates like ``p.grad``: each
backward pass *adds* ``(1/N) sum_{b in micro-batch} g_b^2``. Hence

* k backward calls on mean-reduced micro-batches of equal size, without ``batch_size``: ``p.grad``
  is the sum of k means and ``p.grad_second_moment`` the sum of the k micro-batch second moments;
  dividing both by k gives the statistics of the concatenated batch.
* the usual ``loss = loss_j / k`` pattern: pass ``batch_size=N`` (total examples, or set
  ``tracker.batch_size``); then the mean is over all N examples and ``p.grad`` and
  ``p.grad_second_moment`` after the k calls are exactly those of the concatenated batch.

Lifetime. A backward pass starts from zero instead of adding when ``p.grad`` is ``None`` (the
default ``optimizer.zero_grad()``) or was zeroed in place (``zero_grad(set_to_none=False)``)
since the last backward; :meth:`Tracker.zero` clears explicitly. So the second moment never
outlives the gradient it belongs to. A backward pass that raises (an exception in a hook or a
custom Function, anomaly mode, ``KeyboardInterrupt``) writes no statistic and removes those of
earlier passes; a parameter with a gradient then gets none until its gradient is cleared (the
failed pass may have added to it), and the next pass starts clean.

Exactness. Layer rules are exact (no position-wise shortcut). A parameter used several times in
one backward pass (weight tying, a module called twice, a recurrent cell stepped in a loop) is
handled by summing the per-example gradients of its uses before squaring (materialised per use,
or for linear maps and cells kept as outer-product factors of each use and formed once, at the
end of the pass); all calls between two backward passes
are taken to act on the same batch (example b of each call is the same example). Tensors must
put the batch first where the layer cannot tell (``nn.Linear`` on ``[T, B, in]`` would take T
for the batch; recurrent layers and attention read their own ``batch_first``); inconsistent
batch sizes within one backward pass raise. On the first backward pass the tracker also checks
that every parameter's gradient passed through a call of its module (a parameter used directly
by another module raises). Loss terms that use a parameter outside its module's call (an
explicit L2 penalty) are not part of per-example gradients; use the optimizer's weight decay.
Backward passes through ``torch.autograd.grad`` also record; wrap forward passes that should
not count (gradient penalties, evaluation with grad enabled) in :meth:`Tracker.paused`. Forward
calls inside ``torch.func`` transforms (``vmap``, ``grad``) are never recorded.

Activation checkpointing and offloading. Under saved-tensor hooks (``torch.utils.checkpoint``
with ``use_reentrant=False``, ``torch.autograd.graph.save_on_cpu``) module inputs are kept as
autograd keeps its own saved tensors, so they are freed and recomputed, or offloaded, with the
model's activations, and a checkpoint's rerun of the forward is not a second call
(:mod:`sgdlab.stats._saved`). Reentrant checkpointing needs nothing special: its rerun is the
graph that is differentiated. Statistics are the same as without checkpointing, bitwise.

Example::

    >>> import torch, sgdlab.stats
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> tracker = sgdlab.stats.track(model)
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> torch.nn.functional.mse_loss(model(x), y).backward()
    >>> model[0].weight.grad_second_moment.shape
    torch.Size([8, 4])
    >>> tracker.detach()
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable
from torch.utils.hooks import RemovableHandle

from .._validation import check_batch_size, check_choice
from . import _saved, _stray
from ._attach import (
    Hook,
    innermost,
    refuse_hook_reparametrization,
    refuse_tracked,
    register,
    seq_first_modules,
    unregister,
)
from ._attribute import ATTRIBUTE, clear, cleared_since
from ._deferred import on_lane, on_moments
from ._forward import Recorder
from ._pass import Pass, PassEnd, inverse_scale_squared, raise_modified
from ._record import Entry, Record
from ._registry import rule_for

__all__ = ["ATTRIBUTE", "PassSummary", "Tracker", "track"]


@dataclass(frozen=True)
class PassSummary:
    """What :meth:`Tracker.on_pass_end` reports of a backward pass: ``num_examples``, its
    batch size B (the examples whose ``g_b^2`` it added), and ``parameters``, those whose
    ``grad_second_moment`` it wrote or added to (in the tracker's order)."""

    num_examples: int
    parameters: tuple[nn.Parameter, ...]


class Tracker(Recorder):
    """Augmented backward attached to a model (see the module docstring for the maths).

    Args:
        model: the model; every submodule owning trainable parameters is tracked.
        reduction: ``"mean"`` if the loss is the mean of per-example losses, ``"sum"`` if it is
            their sum.
        batch_size: number of examples N the loss is averaged over (mean) or that the second
            moment averages over; default: the batch dimension of each backward pass.
        per_example_norms: also record ``||g_b||^2`` summed over tracked parameters, read with
            :meth:`per_example_sq_norms`.
        memory_budget: bytes for one chunk of materialised per-example gradients; also bounds
            the calls held for the end of the pass (2-D Linear calls, and calls on a short
            path of at most :data:`DEFER_BYTES`) before they are computed. Default (``None``):
            32 MiB for tensors on the CPU, where cache-sized chunks run faster, and 128 MiB on
            an accelerator, where fewer chunks mean fewer kernel launches (benchmarks/README.md,
            "Augmented backward").
        conv_strategy: how convolutions form per-example gradients, ``"auto"``, ``"unfold"``
            or ``"grouped"`` (see :mod:`sgdlab.stats.conv`); all are exact.
        warn_fallback: warn which modules take the ``torch.func`` fallback.
        grad_scaler: the ``torch.amp.GradScaler`` whose scaled loss the backward passes
            differentiate (``scaler.scale(loss).backward()``): the statistics are divided by
            its scale squared, so they are those of the unscaled loss, as the gradients are
            after ``scaler.unscale_`` (which cannot reach them). Without it, a scaled loss gives
            statistics ``scale**2`` too large.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reduction: str = "mean",
        batch_size: int | None = None,
        per_example_norms: bool = False,
        memory_budget: int | None = None,
        conv_strategy: str = "auto",
        warn_fallback: bool = True,
        grad_scaler: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))
        self.batch_size = batch_size
        for flag, value in (
            ("per_example_norms", per_example_norms),
            ("warn_fallback", warn_fallback),
        ):
            if not isinstance(value, bool):  # "False" would switch it on
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        self.per_example_norms = per_example_norms
        if isinstance(memory_budget, float) and memory_budget.is_integer():
            memory_budget = int(memory_budget)  # 2e8
        if memory_budget is not None and (
            isinstance(memory_budget, bool)
            or not isinstance(memory_budget, numbers.Integral)
            or memory_budget < 1
        ):
            raise ValueError(
                f"memory_budget must be an integer number of bytes >= 1 (or None), "
                f"got {memory_budget!r}"
            )
        self.memory_budget = None if memory_budget is None else int(memory_budget)
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise TypeError(
                "grad_scaler must be a torch.amp.GradScaler (an object with get_scale()), got "
                f"{type(grad_scaler).__name__}"
            )
        self.grad_scaler = grad_scaler
        self.conv_strategy = check_choice(
            "conv_strategy", conv_strategy, ("auto", "unfold", "grouped")
        )
        self._entries: dict[nn.Module, Entry] = {}
        self._handles: list[Any] = []
        self._coverage_handles: list[Any] = []
        self._watch: _stray.Watch | None = None
        self._uses: dict[int, int] = {}
        self._session: set[int] | None = None  # see _recomputed_call
        self._detached = False  # hooks on autograd nodes of earlier calls then do nothing
        self._pass: Pass | None = None
        self._suspended = 0
        self._grad_versions: dict[int, int] = {}
        # parameters whose gradient a failed backward pass may have written to: no statistic
        # until that gradient is cleared (:meth:`_abort`)
        self._unknown: set[int] = set()
        self._norms: list[Tensor] = []
        self._examples = 0
        self._passes = 0  # backward passes in _examples (micro-batches)
        # on_pass_end's subscribers (an OrderedDict: RemovableHandle keeps a weak reference)
        self._subscribers: dict[int, Callable[[PassSummary], Any]] = OrderedDict()
        self._params: dict[int, tuple[str, nn.Parameter]] = {}
        refuse_tracked(model)
        try:
            self._attach(model, warn_fallback)
        except BaseException:  # no hooks left behind by a model that cannot be tracked (and
            self.detach(clear=False)  # no statistic of another tracker's parameters cleared)
            raise

    def _attach(self, model: nn.Module, warn_fallback: bool) -> None:  # noqa: C901
        """Hooks on every module of ``model`` that owns parameters (see :meth:`__init__`)."""
        covered: set[nn.Module] = set()
        fallbacks: list[str] = []
        seq_first = seq_first_modules(model)
        claims = []
        for name, module in model.named_modules():
            if module in covered:
                continue
            rule = rule_for(module)
            owned = rule.params(module)
            if not owned:
                continue
            if torch.nn.utils.parametrize.is_parametrized(module):
                # the fallback differentiates through the parametrizations
                covered.update(module.parametrizations.modules())
            if rule.owns_submodules:  # (attention: out_proj's parameters)
                covered.update(module.modules())
            claims.append((name, module, rule, owned))
        for name, module, rule, owned in innermost(claims):
            refuse_hook_reparametrization(name, module)
            parametrized = torch.nn.utils.parametrize.is_parametrized(module)
            if rule.is_fallback:
                fallbacks.append(f"{name or '<root>'} ({type(module).__name__})")
            entry = Entry(
                module,
                name,
                rule,
                tuple(n for n, _ in owned),
                tuple(p for _, p in owned),
                tuple(id(p) for _, p in owned),
                name or type(module).__name__,
                rule.plain,
            )
            if module in seq_first:  # [T, B, ...] inputs: the general path, transposed
                entry.batch_dim = 1
                entry.plain = False
            elif rule.fast is not None and rule.fast.when(module, self):
                entry.fast = rule.fast
            if entry.fast is not None:
                entry.has_weight = "weight" in entry.names
                entry.has_bias = "bias" in entry.names
            if parametrized:  # buffers its forward may change (spectral norm's vectors)
                entry.buffers = tuple(
                    module.parametrizations.named_buffers(prefix="parametrizations")
                )
            # attention and recurrent layers with dropout redraw their own masks, the fallback
            # those of dropout calls inside the module (layers without dropout get no pre-hook:
            # a host call per step saved)
            entry.dropout = rule.dropout is not None and rule.dropout(module)
            if entry.buffers or entry.dropout:
                self._handles.append(
                    module.register_forward_pre_hook(Hook(self._before_call), with_kwargs=True)
                )
            self._entries[module] = entry
            for n, p in owned:
                self._params.setdefault(id(p), (f"{name}.{n}" if name else n, p))
            fast = entry.fast
            if fast is not None:
                on_grad = on_lane if fast.lane is not None else partial(on_moments, fast.moments)
                more = fast.more and partial(on_moments, fast.more)
                hook = self._fast_hook(entry, on_grad, fast.ndim(module), more)
            else:
                hook = self._forward_hook
            self._handles.append(module.register_forward_hook(Hook(hook), with_kwargs=True))
        if not self._entries:
            raise ValueError("model has no trainable parameters to track")
        register(self, self._entries, self._params)
        self._plist = [(pid, p) for pid, (_, p) in self._params.items()]
        # coverage check (a parameter whose gradient bypasses its module's call) on the first
        # backward pass; the hooks are removed after it, so later steps pay nothing for them
        self._coverage_handles = [
            p.register_post_accumulate_grad_hook(self._grad_hook) for _, p in self._params.values()
        ]
        # and the uses of a parameter outside its module's calls (_stray), on the first forward
        owners: dict[int, tuple[str, set[nn.Module]]] = {}
        for module, entry in self._entries.items():
            for pid in entry.ids:
                owners.setdefault(pid, (self._params[pid][0], set()))[1].add(module)
        self._watch = _stray.Watch(model, owners, Hook)
        if fallbacks and warn_fallback:
            warnings.warn(
                "sgdlab.stats: no dedicated rule for "
                + ", ".join(fallbacks)
                + "; these take the exact but slower torch.func fallback",
                stacklevel=4,
            )
        self.fallback_modules = tuple(fallbacks)

    # ----------------------------------------------------------------- public
    @property
    def batch_size(self) -> int | None:
        """N of the mean: None means each backward pass's own batch dimension."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self._batch_size = None if value is None else check_batch_size("batch_size", value)

    @property
    def parameters(self) -> list[nn.Parameter]:
        """Tracked parameters (each once)."""
        return [p for _, p in self._params.values()]

    @property
    def num_examples(self) -> int:
        """Examples seen by backward passes since the statistics were last cleared."""
        return self._examples

    @property
    def passes(self) -> int:
        """Backward passes (micro-batches) whose statistics were added up since the last
        clear: more than one means ``grad_second_moment`` sums micro-batch means."""
        return self._passes

    def per_example_sq_norms(self) -> Tensor:
        """``||g_b||^2`` over all tracked parameters for each example since the last clear,
        in the order of the backward passes (requires ``per_example_norms=True``)."""
        if not self.per_example_norms:
            raise ValueError(
                "per_example_sq_norms needs track(model, per_example_norms=True), got "
                "per_example_norms=False"
            )
        if not self._norms:
            raise ValueError("no backward pass since the statistics were last cleared")
        return torch.cat(self._norms)

    def on_pass_end(self, fn: Callable[[PassSummary], Any]) -> RemovableHandle:
        """Call ``fn(summary)`` at the end of each backward pass that wrote statistics, after
        they are written (:class:`PassSummary`: the examples the pass saw, the parameters that
        got statistics); a pass that raises or records no call signals nothing. Returns a
        handle whose ``remove()`` unsubscribes."""
        if not callable(fn):
            raise TypeError(f"on_pass_end needs a callable, got {type(fn).__name__}")
        handle = RemovableHandle(self._subscribers)
        self._subscribers[handle.id] = fn
        return handle

    def zero(self) -> None:
        """Clear ``grad_second_moment`` of every tracked parameter and the recorded norms."""
        for _, p in self._params.values():
            if hasattr(p, ATTRIBUTE):
                setattr(p, ATTRIBUTE, None)
        self._norms = []
        self._examples = 0
        self._passes = 0
        self._grad_versions.clear()
        self._unknown.clear()

    def detach(self, clear: bool = True) -> None:
        """Remove all hooks; with ``clear`` also delete the ``grad_second_moment`` attributes."""
        for h in self._handles + self._coverage_handles:
            h.remove()
        self._handles = []
        self._coverage_handles = []
        if self._watch is not None:
            self._watch.remove()
        unregister(self, self._entries, self._params)
        self._detached = True
        self._pass = None  # a pass running now (detached mid-backward) is dropped
        if clear:
            for _, p in self._params.values():
                if hasattr(p, ATTRIBUTE):
                    delattr(p, ATTRIBUTE)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside this block are not recorded (evaluation with grad enabled,
        gradient penalties through ``torch.autograd.grad``): their backward passes leave the
        statistics untouched."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # --------------------------------------------------- backward-side hooks
    def _grad_hook(self, p: Tensor) -> None:
        if id(p) in self._params:  # not a copy of a tracked parameter (copy.deepcopy)
            self._begin().got_grad.add(id(p))

    def _begin(self) -> Pass:
        """The state of the running backward pass, made by its first hook."""
        state = self._pass
        if state is not None:
            return state
        state = self._pass = Pass(self)
        Variable._execution_engine.queue_callback(PassEnd(self, state))
        cleared = state.cleared = cleared_since(self._plist, self._grad_versions, self._unknown)
        # a gradient that was cleared (None, or zeroed in place) clears its statistic
        if cleared:
            self._unknown.difference_update(cleared)
            self._norms = []
            self._examples = 0
            self._passes = 0
        return state

    def _on_grads(self, record: Record, grads: tuple[Tensor | None, ...]) -> None:
        if self._detached:
            return
        self._session = None
        try:
            (self._pass or self._begin()).on_grads(record, grads)
        except BaseException:
            self._abort()
            raise

    def _abort(self, state: Pass | None = None) -> None:
        """Forget a failed backward pass (``state``; default: the running one), which never
        reaches its end-of-pass callback, so that the next forward and backward passes start
        clean; none of its statistics is written. The statistics of earlier passes are removed:
        the failed pass may have added to the gradients they belong to, so a parameter that has
        a gradient gets none until its gradient is cleared (a per-example optimizer step then
        refuses it, instead of taking a stale value for the gradient's)."""
        if state is None:
            state = self._pass
        elif state is not self._pass:
            return  # already aborted (the tracker's own error), or the tracker detached
        self._pass = None
        self._uses = {}
        self._session = None
        if state is None:
            return
        for pid, p in self._plist:
            if p.grad is not None:
                self._unknown.add(pid)
            if getattr(p, ATTRIBUTE, None) is not None:
                setattr(p, ATTRIBUTE, None)
        self._norms = []
        self._examples = 0
        self._passes = 0

    def _on_fast_grad(self, on_grad: Any, record: Record, nr: int, grads: tuple) -> None:
        """Output gradient of a call on a short path (:meth:`_register_fast`): the checks of
        every call, then ``on_grad(state, record, d)`` unless the output got no gradient."""
        if self._detached:
            return
        self._session = None
        try:
            state = self._pass or self._begin()
            entry, B = record.entry, record.batch_size
            if record.saved is not None:  # a SavedTensor (saved-tensor hooks): unpacked here
                x = _saved.unpack(record.saved)
                args = (x,)
                record = Record(entry, args, {}, (x._version,), args, B, record.uses, None, (0,))
            elif record.inputs[0]._version != record.versions[0]:
                raise_modified(entry)
            if state.batch_size != B:
                state.check_batch(entry, B)
            d = grads[nr]
            if not B:
                state.empty(entry)
            elif d is not None:
                on_grad(state, record, d)
        except BaseException:
            self._abort()
            raise

    def _on_fast_view_grad(
        self, on_grad: Any, record: Record, nr: int, shape: torch.Size, grads: tuple
    ) -> None:
        """:meth:`_on_fast_grad` for an output that reshapes the tensor ``grads[nr]`` is the
        gradient of."""
        g = grads[nr]
        self._on_fast_grad(on_grad, record, 0, (None if g is None else g.reshape(shape),))

    def _finish(self) -> None:
        state, self._pass = self._pass, None
        self._uses = {}
        self._session = None
        if state is None:
            return
        try:
            self._finish_pass(state)
        except BaseException:
            clear(state.cleared)
            raise

    def _finish_pass(self, state: Pass) -> None:
        if state.deferred.items:
            state.deferred.flush(state)
        cleared = state.cleared
        if cleared:  # statistics of cleared gradients that this pass does not replace
            replaced = state.replaced()
            clear({k: p for k, p in cleared.items() if k not in replaced})
        # the coverage check runs on the first pass that records a call (a pass of paused
        # forward calls records none: it can tell nothing)
        if self._coverage_handles and state.contributed:
            for h in self._coverage_handles:
                h.remove()
            self._coverage_handles = []
            missing = state.got_grad - state.contributed
            _stray.check_coverage(self._watch, sorted(self._params[pid][0] for pid in missing))
        if state.batch_size is None:
            return
        nscale = state.reduce(self._params, inverse_scale_squared(self.grad_scaler))
        unknown = self._unknown
        for pid, m in state.moments.items():
            if pid in unknown:  # its gradient holds a failed pass's part (_abort)
                continue
            _, p = self._params[pid]
            old = None if pid in cleared else getattr(p, ATTRIBUTE, None)
            if old is None:
                setattr(p, ATTRIBUTE, m)
            else:
                old.add_(m)
            g = p.grad
            if g is not None:
                self._grad_versions[pid] = g._version
        if self.per_example_norms and state.norms is not None:
            self._norms.append(state.norms * nscale)
        self._examples += state.batch_size
        self._passes += 1
        if self._subscribers:
            summary = PassSummary(
                state.batch_size,
                tuple(p for pid, p in self._plist if pid in state.moments and pid not in unknown),
            )
            for fn in tuple(self._subscribers.values()):
                fn(summary)


def track(
    model: nn.Module,
    *,
    reduction: str = "mean",
    batch_size: int | None = None,
    per_example_norms: bool = False,
    memory_budget: int | None = None,
    conv_strategy: str = "auto",
    warn_fallback: bool = True,
    grad_scaler: Any = None,
) -> Tracker:
    """Attach the augmented backward to ``model``; returns the :class:`Tracker`.

    After ``loss.backward()`` each tracked parameter holds ``p.grad_second_moment``
    = (1/N) sum_b g_b * g_b. See :mod:`sgdlab.stats.tracker` for reduction, accumulation and
    lifetime. Use as a context manager or call ``tracker.detach()`` to remove it.

    Example::

        >>> import torch, sgdlab.stats
        >>> model = torch.nn.Linear(3, 2)
        >>> with sgdlab.stats.track(model) as tracker:
        ...     model(torch.randn(5, 3)).pow(2).mean().backward()
        ...     model.weight.grad_second_moment.shape
        torch.Size([2, 3])
    """
    return Tracker(
        model,
        reduction=reduction,
        batch_size=batch_size,
        per_example_norms=per_example_norms,
        memory_budget=memory_budget,
        conv_strategy=conv_strategy,
        warn_fallback=warn_fallback,
        grad_scaler=grad_scaler,
    )
