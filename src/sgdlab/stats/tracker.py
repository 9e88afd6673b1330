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
import functools
import inspect
import math
import numbers
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._validation import check_batch_size, check_choice
from . import _rng, _saved, _stray, _tap
from ._base import Call, Contribution, outer_moments, outer_per_example
from ._registry import FastPath, Rule, first_dim, rule_for

__all__ = ["Tracker", "track", "ATTRIBUTE"]

ATTRIBUTE = "grad_second_moment"
CPU_BUDGET = 2**25  # default memory_budget for CPU tensors (bytes)
DEVICE_BUDGET = 2**27  # default memory_budget on accelerators (bytes)
# short-path calls whose input and output gradient hold at most this many bytes are computed
# with the Linear lane at the end of the pass: for such calls the host's work is the cost, and
# back to back it is about 1.6x cheaper than interleaved with the backward pass (measured on
# small models, benchmarks/README.md); larger calls run as their gradient arrives
DEFER_BYTES = 2**20


# the tracker attached to each tracked module (while its hooks are on): a second tracker on the
# same module would add every statistic twice when gradients accumulate
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


# id of each tracked parameter -> (the parameter, its tracker), weakly: a parameter shared by
# modules of two trackers (a head tied to an embedding) would get two statistics added
_TRACKED: dict[int, tuple[weakref.ref, weakref.ref]] = {}

# the autograd engine's running graph task (-1: none); a call recorded while one runs is a
# reentrant checkpoint's recomputation (:meth:`Tracker._recomputed_call`)
_graph_task = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _tracker_of(p: Tensor) -> Tracker | None:
    found = _TRACKED.get(id(p))
    if found is None or found[0]() is not p:
        return None
    tracker = found[1]()
    return tracker if tracker is not None and tracker._handles else None


def _attached(module: nn.Module) -> Tracker | None:
    ref = _ATTACHED.get(module)
    tracker = ref() if ref is not None else None
    return tracker if tracker is not None and tracker._handles else None


def _inert_hook(module: nn.Module, *args: Any) -> None:
    """The forward (pre-)hook a copy of a tracked module gets: a copy is not tracked."""
    return None


class _Hook(functools.partial):
    """A tracker's forward hook as registered on a module (called like the function it wraps,
    in C): a deep copy of the module (an EMA or teacher model) gets :func:`_inert_hook`, not a
    hook that would record the copy's calls as the original's and write their statistics onto
    the original's parameters; pickling the module (``torch.save(model)``) is refused with a
    clear message rather than with the pickler's about a local function."""

    def __deepcopy__(self, memo: dict) -> Any:
        return _inert_hook

    def __reduce__(self) -> Any:
        raise TypeError(
            "a module with an sgdlab.stats tracker attached cannot be pickled (its forward hooks "
            "belong to the running tracker): save model.state_dict(), or call tracker.detach() "
            "before torch.save(model)"
        )


def _zeroed(written: list[tuple[nn.Parameter, Tensor]]) -> list[nn.Parameter]:
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


# the level of the innermost torch.func transform (vmap, grad, ...) running, None outside any:
# forward calls inside one (per-example gradients computed by the user, functional training
# loops) act on functional parameters and batched tensors, not on a batch the tracker records
_transform_level = torch._C._functorch.maybe_current_level


@functools.cache
def _forward_params(cls: type) -> tuple[str, ...]:
    """Names of the parameters of ``cls.forward`` after ``self`` that may be passed by
    position, in order (empty where the signature cannot be read)."""
    try:
        sig = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return ()
    names = []
    for p in list(sig.parameters.values())[1:]:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return tuple(names)


def _positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call's keyword arguments that fill the next positional parameters of its forward
    moved into ``args`` (``linear(input=x)`` becomes ``linear(x)``): the rules read a layer's
    input as ``args[0]``."""
    names = _forward_params(type(module))[len(args) :]
    if not names or names[0] not in kwargs:
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for name in names:
        if name not in kwargs:
            break
        args.append(kwargs.pop(name))
    return tuple(args), kwargs


def _default_budget(t: Tensor) -> int:
    return CPU_BUDGET if t.is_cpu else DEVICE_BUDGET


def _without_grad(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` outside autograd: rules run inside backward passes, which record a graph
    only under ``create_graph=True`` (checked first, so that the usual pass enters no
    context)."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return fn(*args)
    return fn(*args)


def _shared(entry: _Entry, uses: dict[int, int]) -> bool:
    """Whether a parameter of ``entry`` was used more than once in the forward pass (its
    per-example gradients must be summed over uses before squaring: the general rule)."""
    for pid in entry.ids:
        if uses[pid] > 1:
            return True
    return False


def _differentiable(output: Any) -> tuple[list[Tensor], tuple[int, ...], Any, list | None] | None:
    """The outputs of a call that require grad: ``(tensors, their positions among the leaves,
    the output's pytree spec, the leaves)``, the spec and leaves ``None`` for a single tensor;
    ``None`` when no output requires grad."""
    if isinstance(output, Tensor):  # the common case, without pytree overhead
        return ([output], (0,), None, None) if output.requires_grad else None
    leaves, spec = tree_flatten(output)
    positions = tuple(i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad)
    if not positions:
        return None
    return [leaves[i] for i in positions], positions, spec, leaves


def _seq_first_modules(model: nn.Module) -> set[nn.Module]:
    """The modules inside torch's transformer modules built with ``batch_first=False`` (their
    feed-forward and norm layers see ``[T, B, d]``); their attention reads its own flag."""
    found: set[nn.Module] = set()
    for module in model.modules():
        layer = module
        if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
            layer = module.layers[0] if len(module.layers) else None
        if isinstance(layer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            seq_first = not layer.self_attn.batch_first
        elif isinstance(module, nn.Transformer):
            seq_first = not module.batch_first
        else:
            continue
        if seq_first:
            found.update(m for m in module.modules() if not isinstance(m, nn.MultiheadAttention))
    return found


def _refuse_hook_reparametrization(name: str, module: nn.Module) -> None:
    """The hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm`` set the weight as a
    plain attribute in a forward pre-hook, out of reach of the rules and of the fallback; their
    ``torch.nn.utils.parametrizations`` versions compute the same weight and are supported."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
            raise ValueError(
                f"module {name or type(module).__name__!r} uses the hook-based "
                f"torch.nn.utils.{kind}, whose weight is out of the tracker's reach: apply "
                f"torch.nn.utils.parametrizations.{kind} instead (the same reparametrization, "
                "supported)"
            )


def _innermost(claims: list[tuple[str, nn.Module, Rule, list]]) -> list[tuple]:
    """The modules that own parameters, each with the parameters it is responsible for: a
    parameter that a module registers as its own and one of its submodules too (Opacus's
    DPRNN names its cells' weights ``weight_ih_l0``...; ``self.w = self.lin.weight``) is the
    innermost module's, whose calls use it; the outer module would differentiate through them
    again and count each use twice. A use of it in the outer module's own forward is then a
    use outside a call of its module (refused on the first pass). Modules left with no
    parameter are dropped."""
    holders: dict[int, list[str]] = {}
    for name, _, _, owned in claims:
        for _, p in owned:
            holders.setdefault(id(p), []).append(name)

    def inner(name: str, pid: int) -> bool:
        prefix = f"{name}." if name else ""
        return any(other != name and other.startswith(prefix) for other in holders[pid])

    out = []
    for name, module, rule, owned in claims:
        kept = [(n, p) for n, p in owned if not inner(name, id(p))]
        if kept:
            out.append((name, module, rule, kept))
    return out


def _changed(entry: _Entry) -> dict[str, Tensor] | None:
    """Copies of the buffers of a parametrized module that its call just changed (spectral
    norm's power iteration): the call's statistics are computed with these values later."""
    if len(entry.versions) != len(entry.buffers):  # the pre-hook did not see this call
        return None
    changed = {
        n: b.detach().clone()
        for (n, b), v in zip(entry.buffers, entry.versions, strict=True)
        if b._version != v
    }
    return changed or None


def _check_state(entry: _Entry) -> None:
    """Refuse a call of a fallback module whose forward pass changed one of its buffers (in
    place or by assigning a new tensor): the fallback reruns the forward once per example,
    which would update the state again from one example, with other values than the batched
    call used (a running mean of the batch), and leave the module holding its tensors."""
    state, entry.state = entry.state, None
    module = entry.module
    changed = []
    for name, buffer, version in state or ():
        try:
            now = module.get_buffer(name)
        except AttributeError:
            now = None
        if now is not buffer or buffer._version != version:
            changed.append(name)
    if changed:
        raise ValueError(
            f"sgdlab.stats: {entry.name + ' ' if entry.name else ''}({type(module).__name__}) "
            f"changed its buffers "
            f"{changed} in its forward pass; it takes the per-example fallback, which reruns "
            "the forward once per example and cannot reproduce a state update (it may depend "
            "on the whole batch, as a running mean does). Update the state outside the "
            "module's forward, or give the module a rule (sgdlab.stats.register_rule)"
        )


def _unpacked(record: _Record) -> _Record:
    """``record`` with its saved inputs (:meth:`Tracker._saved_forward`) unpacked into
    ``args`` and ``kwargs``."""
    saved, spec = record.saved
    flat = [_saved.unpack(t) if isinstance(t, _saved.SavedTensor) else t for t in saved]
    args, kwargs = tree_unflatten(flat, spec)
    return _Record(
        record.entry,
        args,
        kwargs,
        (),
        (),
        record.batch_size,
        record.uses,
        record.out_spec,
        record.positions,
        None,
        record.buffers,
        record.rng,
    )


def _clear(params: dict[int, nn.Parameter]) -> None:
    """Remove the statistic of each parameter (its gradient was cleared)."""
    for p in params.values():
        if getattr(p, ATTRIBUTE, None) is not None:
            setattr(p, ATTRIBUTE, None)


class _PassEnd:
    """The end-of-pass callback queued on the autograd engine by a pass's first hook. A
    backward pass that fails (an exception in a tensor hook or a custom Function's backward,
    anomaly mode's NaN check, a KeyboardInterrupt) drops its queued callbacks unrun: the engine
    releases this object then, before the exception reaches the caller, and its deletion aborts
    the pass (:meth:`Tracker._abort`)."""

    __slots__ = ("tracker", "state", "ran")

    def __init__(self, tracker: Tracker, state: _Pass) -> None:
        self.tracker, self.state, self.ran = tracker, state, False

    def __call__(self) -> None:
        self.ran = True
        self.tracker._finish()

    def __del__(self) -> None:
        if not self.ran:
            self.tracker._abort(self.state)


_NONE: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Entry:
    module: nn.Module
    name: str
    rule: Rule
    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    ids: tuple[int, ...] = ()
    label: str = ""
    plain: bool = False  # no input check, batch size = first dimension of the first input
    fast: FastPath | None = None  # the rule's short path, if this tracker takes it
    has_weight: bool = False  # short paths: which of weight, bias (in this order) are tracked
    has_bias: bool = False
    # a parametrized module: its parametrizations' buffers and their versions before the
    # running call (:meth:`Tracker._before_call`)
    buffers: tuple[tuple[str, Tensor], ...] = ()
    versions: tuple[int, ...] = ()
    # 1: the module sees [T, B, ...] inputs (inside a torch transformer with batch_first=False)
    batch_dim: int = 0
    # attention and recurrent layers with dropout, fallback modules: the generator states
    # before the running call (:meth:`Tracker._before_call`)
    dropout: bool = False
    rng: Any = None
    # fallback modules: their buffers and versions before the running call (a forward pass
    # that changes them is refused: :func:`_check_state`)
    state: tuple[tuple[str, Tensor, int], ...] | None = None


@dataclass(slots=True)
class _Record:
    entry: _Entry
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    versions: tuple[int, ...]
    inputs: tuple[Tensor, ...]
    batch_size: int
    uses: dict[int, int]
    out_spec: Any
    positions: tuple[int, ...]
    # under saved-tensor hooks: (flattened args and kwargs with SavedTensor for tensors, spec);
    # args and kwargs are unpacked from it when the output gradients arrive
    saved: Any = None
    buffers: dict[str, Tensor] | None = None  # see Call.buffers
    rng: Any = None  # see Call.rng
    outputs: tuple[tuple[Tensor, int], ...] | None = None  # see Call.outputs


class _Pass:
    """State of one backward pass (a plain class: one is made per backward pass)."""

    __slots__ = (
        "batch_size",
        "moments",
        "pending",
        "kind",
        "norms",
        "got_grad",
        "contributed",
        "first_module",
        "scale",
        "stash",
        "stash_bytes",
        "cleared",
        "factors",
        "rows",
    )

    def __init__(self) -> None:
        self.batch_size: int | None = None
        self.moments: dict[int, Tensor] = {}
        self.pending: dict[int, Tensor] = {}
        self.kind: dict[int, str] = {}
        self.norms: Tensor | None = None
        self.got_grad: set[int] = set()
        self.contributed: set[int] = set()
        self.first_module = ""
        self.scale = 1.0
        # 2-D nn.Linear calls whose output gradient has arrived, computed together by _flush
        # (record of _fast_hook, output grad, moments function or None for the Linear lane)
        self.stash: list[tuple[tuple, Tensor, Any]] = []
        self.stash_bytes = 0
        # parameters whose gradient was cleared since the last pass: their statistic restarts
        # (replaced at the end of the pass, or removed if this pass gives it nothing)
        self.cleared: dict[int, nn.Parameter] = {}
        # per-example gradients of shared parameters as outer-product factors, per use
        self.factors: dict[int, list[tuple[Tensor, Tensor]]] = {}
        # per-example gradients of shared lookup tables as sparse rows, per use
        self.rows: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}


class Tracker:
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
            an accelerator, where fewer chunks mean fewer kernel launches (measured on the
            benchmark CNN: CPU 1.33x plain at 32 MiB vs 1.54x at 128 MiB; H200 1.85x vs 2.02x).
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
        self._entries: dict[nn.Module, _Entry] = {}
        self._handles: list[Any] = []
        self._coverage_handles: list[Any] = []
        self._watch: _stray.Watch | None = None
        self._uses: dict[int, int] = {}
        self._session: set[int] | None = None  # see _recomputed_call
        self._detached = False  # hooks on autograd nodes of earlier calls then do nothing
        self._pass: _Pass | None = None
        self._suspended = 0
        self._grad_versions: dict[int, int] = {}
        # parameters whose gradient a failed backward pass may have written to: no statistic
        # until that gradient is cleared (:meth:`_abort`)
        self._unknown: set[int] = set()
        self._norms: list[Tensor] = []
        self._examples = 0
        self._passes = 0  # backward passes in _examples (micro-batches)
        self._params: dict[int, tuple[str, nn.Parameter]] = {}
        for name, module in model.named_modules():
            if _attached(module) is not None:
                raise ValueError(
                    f"module {name or type(module).__name__!r} is already tracked by another "
                    "Tracker (both would add their statistics to grad_second_moment): detach "
                    "that one first (tracker.detach()), or use it instead of a new one (e.g. "
                    "sgdlab.distributed.DataParallel(..., tracker=tracker))"
                )
        try:
            self._attach(model, warn_fallback)
        except BaseException:  # no hooks left behind by a model that cannot be tracked (and
            self.detach(clear=False)  # no statistic of another tracker's parameters cleared)
            raise

    def _attach(self, model: nn.Module, warn_fallback: bool) -> None:
        """Hooks on every module of ``model`` that owns parameters (see :meth:`__init__`)."""
        covered: set[nn.Module] = set()
        fallbacks: list[str] = []
        seq_first = _seq_first_modules(model)
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
        for name, module, rule, owned in _innermost(claims):
            _refuse_hook_reparametrization(name, module)
            parametrized = torch.nn.utils.parametrize.is_parametrized(module)
            if rule.is_fallback:
                fallbacks.append(f"{name or '<root>'} ({type(module).__name__})")
            entry = _Entry(
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
                    module.register_forward_pre_hook(_Hook(self._before_call), with_kwargs=True)
                )
            self._entries[module] = entry
            _ATTACHED[module] = weakref.ref(self)
            for n, p in owned:
                self._params.setdefault(id(p), (f"{name}.{n}" if name else n, p))
            fast = entry.fast
            if fast is not None:
                on_grad = (
                    self._on_lane_grad
                    if fast.lane is not None
                    else functools.partial(self._on_moments_grad, fast.moments)
                )
                more = fast.more and functools.partial(self._on_moments_grad, fast.more)
                hook = self._fast_hook(entry, on_grad, fast.ndim(module), more)
            else:
                hook = self._forward_hook
            self._handles.append(module.register_forward_hook(_Hook(hook), with_kwargs=True))
        if not self._entries:
            raise ValueError("model has no trainable parameters to track")
        for name, p in self._params.values():
            if _tracker_of(p) not in (None, self):
                raise ValueError(
                    f"parameter {name!r} is already tracked by another Tracker through a module "
                    "that shares it (a head tied to an embedding): each would square only its "
                    "own use and both would add to grad_second_moment. Track the modules that "
                    "share it with one tracker (their common parent)"
                )
        for pid, (_, p) in self._params.items():
            _TRACKED[pid] = (weakref.ref(p), weakref.ref(self))
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
        self._watch = _stray.Watch(model, owners, _Hook)
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
        for module in self._entries:
            ref = _ATTACHED.get(module)
            if ref is not None and ref() is self:
                del _ATTACHED[module]
        for pid in self._params:
            found = _TRACKED.get(pid)
            if found is not None and found[1]() in (self, None):
                del _TRACKED[pid]
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

    # ------------------------------------------------------------------ hooks
    def _fast_hook(self, entry: _Entry, on_grad: Any, ndim: int, on_more: Any = None) -> Any:
        """The forward hook of an ``nn.Linear`` or a convolution: calls on one ``ndim``-dim
        tensor (``[B, in]``; ``[B, C, *spatial]``), or with ``on_more`` on one tensor of more
        dims (``[B, T..., in]``), take a short path: a pre-hook that checks the call
        (:meth:`_on_fast_grad`) and hands it to ``on_grad`` (:meth:`_on_linear_grad`,
        :meth:`_on_moments_grad`) or ``on_more``; other calls take the general hook."""
        general = self._forward_hook
        fast = (on_grad, ndim, on_more)
        tracked = entry.module

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if module is not tracked:
                return None  # a shallow copy sharing the tracked module's hooks
            if _transform_level() is not None:
                return None  # inside torch.func (vmap, grad): not a pass the tracker records
            if _saved.hooks() is not None:
                return self._saved_forward(module, args, kwargs, output, fast)
            if kwargs or len(args) != 1 or self._suspended or self.per_example_norms:
                return general(module, args, kwargs, output)
            x = args[0]
            if not (isinstance(x, Tensor) and isinstance(output, Tensor)):
                return general(module, args, kwargs, output)
            dim = x.dim()
            if dim == ndim:
                handler = on_grad
            elif on_more is not None and dim > ndim:
                handler = on_more
            else:
                return general(module, args, kwargs, output)
            if output.grad_fn is None:
                return None  # nothing requires grad (or grad mode is off)
            return self._register_fast(entry, handler, x, x._version, x.shape[0], output, x)

        return hook

    def _count_uses(self, entry: _Entry) -> dict[int, int]:
        """One more call of ``entry``'s parameters in this forward pass; the use counts."""
        uses = self._uses
        if _graph_task() != -1:
            self._recomputed_call(entry, uses)
        for pid in entry.ids:
            uses[pid] = uses.get(pid, 0) + 1
        return uses

    def _recomputed_call(self, entry: _Entry, uses: dict[int, int]) -> None:
        """A call recorded while a backward pass runs: the forward of a reentrant checkpoint
        (``use_reentrant=True``), rerun when the backward pass reaches it, whose gradients
        then arrive in a backward pass nested in the outer one. The pass's end is queued here,
        on the outer pass (queued from the nested one, it ended with it: two passes, norms
        lost). A parameter whose uses span regions or the rest of the model is refused: its
        gradients arrive before its other uses are known (a "session" is one region's
        recomputation: the calls recorded until gradients flow again)."""
        session = self._session
        if session is None:
            session = self._session = set()
        for pid in entry.ids:
            if uses.get(pid, 0) and pid not in session:
                raise ValueError(
                    f"{entry.label}: its parameter {self._params[pid][0]!r} is used inside a "
                    "reentrant checkpoint (use_reentrant=True) and elsewhere in the pass (outside "
                    "it, or in another region); the region's calls are recorded only when the "
                    "backward pass recomputes it, after the gradients of the other uses, so "
                    "their per-example gradients cannot be summed before squaring. Use "
                    "checkpoint(..., use_reentrant=False)"
                )
            session.add(pid)
        if self._pass is None:
            self._begin()

    def _register_fast(
        self,
        entry: _Entry,
        handler: Any,
        x: Any,
        version: int | None,
        B: int,
        output: Tensor,
        live: Tensor,
    ) -> Tensor | None:
        """A call on a short path: a pre-hook on the output's node hands ``(entry, input, its
        version, batch size, use counts)`` to :meth:`_on_fast_grad` (``x`` a SavedTensor and
        ``version`` None under saved-tensor hooks; ``live`` the input itself). An output that
        is a view is listened for where an in-place operation on it cannot hide its gradient
        (:mod:`sgdlab.stats._tap`); returns the replacement output, if any."""
        record = (entry, x, version, B, self._count_uses(entry))
        if output._base is None:
            output.grad_fn.register_prehook(
                functools.partial(self._on_fast_grad, handler, record, output.output_nr)
            )
            return None
        found = _tap.view_source(output, (live,))
        if found is not None:  # nn.Linear on [B, T, in]: its product, before the reshape
            node, nr = found
            node.register_prehook(
                functools.partial(self._on_fast_grad, handler, record, nr)
                if entry.fast.flat_grad
                # (the Linear rules take the product's gradient [B * T, out] as it is)
                else functools.partial(self._on_fast_view_grad, handler, record, nr, output.shape)
            )
            return None
        (tapped,) = _tap.Tap.apply(
            functools.partial(self._on_fast_grad, handler, record, 0), output
        )
        return tapped

    @staticmethod
    def _batch_of(entry: _Entry, module: nn.Module, args: tuple, kwargs: dict) -> int:
        """The batch size of a call on the general path (its rule's checks run first)."""
        if entry.plain and not kwargs and len(args) == 1 and isinstance(args[0], Tensor):
            if args[0].dim() == 0:
                first_dim(module, args, kwargs)  # raises with the message
            return args[0].shape[0]
        entry.rule.check(module, args, kwargs)
        if entry.batch_dim:
            x = args[0] if args else next(iter(kwargs.values()))
            if not isinstance(x, Tensor) or x.dim() < 2:
                raise ValueError(
                    f"{entry.label} is inside a transformer with batch_first=False and needs "
                    f"a [T, B, ...] input, got {getattr(x, 'shape', type(x).__name__)}"
                )
            return x.shape[1]
        return entry.rule.batch_size(module, args, kwargs)

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        entry = self._entries.get(module)
        if entry is None:
            return None  # a shallow copy sharing a tracked module's hooks
        if _transform_level() is not None:
            return None  # inside torch.func (vmap, grad): not a pass the tracker records
        if _saved.hooks() is not None:
            return self._saved_forward(module, args, kwargs, output, None)
        if self._suspended or not torch.is_grad_enabled():
            return None
        if entry.state:
            _check_state(entry)
        if kwargs:
            args, kwargs = _positional(module, args, kwargs)
        found = _differentiable(output)
        if found is None:
            return None
        outs, positions, spec, leaves = found
        B = self._batch_of(entry, module, args, kwargs)
        if entry.plain and not kwargs and len(args) == 1 and isinstance(args[0], Tensor):
            # the common case (Linear, Conv, norms on one tensor) in a few lookups
            flat_in = sargs = args
            skwargs = kwargs
            versions: tuple[int, ...] = (args[0]._version,)
        else:
            if not kwargs and all(isinstance(a, Tensor) for a in args):
                flat_in = sargs = args  # rules run without grad mode (or detach themselves)
                skwargs = kwargs
            else:
                flat_in = tuple(t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor))
                sargs = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, args)
                skwargs = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, kwargs)
            versions = tuple(t._version for t in flat_in)
        record = _Record(
            entry=entry,
            args=sargs,
            kwargs=skwargs,
            versions=versions,
            inputs=flat_in,
            batch_size=B,
            uses=self._count_uses(entry),
            out_spec=spec,
            positions=positions,
        )
        if entry.buffers:
            record.buffers = _changed(entry)
        if entry.dropout:
            record.rng = _rng.recorded(entry.rng)
        if entry.rule.is_fallback:  # its rerun is checked against them
            record.outputs = tuple((o.detach(), o._version) for o in outs)
        return self._register(record, outs, leaves)

    def _register(
        self,
        record: _Record,
        outs: list[Tensor],
        leaves: list | None,
        inputs: tuple[Tensor, ...] | None = None,
    ) -> Any:
        """Have the output gradients of a recorded call delivered to :meth:`_on_grads`, as the
        call returned its outputs, also when they are modified in place later
        (:mod:`sgdlab.stats._tap`): a pre-hook on the node that produced a single output that
        is not a view (or on the node of the tensor a ``torch.nn`` module's output view
        reshapes); otherwise the outputs are replaced by the aliases of one :class:`Tap`, whose
        backward delivers the gradients of all of them at once. That also keeps the gradient of
        each output apart from gradients that reach it through another output (torch's
        ``LSTMCell`` on the CPU returns ``c`` and computes ``h`` from it). Returns the
        replacement output, or ``None``. ``inputs``: the call's tensor inputs, where
        ``record.inputs`` does not hold them (saved-tensor hooks)."""
        if len(outs) == 1:
            out = outs[0]
            node = out.grad_fn
            if node is None:  # the module returned a leaf tensor
                out.register_hook(lambda g: self._on_grads(record, (g,)))
                return None
            if out._base is None:
                nr = out.output_nr
                node.register_prehook(lambda gs: self._on_grads(record, (gs[nr],)))
                return None
            found = None
            if type(record.entry.module).__module__.startswith("torch.nn"):
                found = _tap.view_source(out, record.inputs if inputs is None else inputs)
            if found is not None:
                base_node, nr = found
                shape = out.shape
                base_node.register_prehook(
                    lambda gs: self._on_grads(
                        record, (None if gs[nr] is None else gs[nr].reshape(shape),)
                    )
                )
                return None
        tapped = _tap.Tap.apply(lambda gs: self._on_grads(record, gs), *outs)
        if leaves is None:
            return tapped[0]
        leaves = list(leaves)
        for i, o in zip(record.positions, tapped, strict=True):
            leaves[i] = o
        return tree_unflatten(leaves, record.out_spec)

    def _saved_forward(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any, fast: tuple | None
    ) -> None:
        """The forward hook while saved-tensor hooks are active (activation checkpointing,
        offloading; :mod:`sgdlab.stats._saved`): every tensor input of a call whose output
        requires grad is saved through the hooks, in the same order in a checkpoint's rerun as
        in the first run; the rerun records nothing. ``fast``: the short path's handlers
        ``(on_grad, ndim, on_more)`` of :meth:`_fast_hook`, or ``None``."""
        entry = self._entries.get(module)
        if entry is None or not torch.is_grad_enabled():
            return None
        found = _differentiable(output)
        if found is None:
            return None
        outs, positions, spec, leaves = found
        active = _saved.hooks()
        if kwargs:
            args, kwargs = _positional(module, args, kwargs)
        flat, in_spec = tree_flatten((args, kwargs))
        saved = [_saved.save(t) if isinstance(t, Tensor) else t for t in flat]
        if self._suspended or _saved.recomputing(active):
            return None
        if entry.state:
            _check_state(entry)
        if (
            fast is not None
            and spec is None
            and output.grad_fn is not None
            and not kwargs
            and len(args) == 1
            and isinstance(args[0], Tensor)
            and not self.per_example_norms
        ):
            on_grad, ndim, on_more = fast
            x = args[0]
            dim = x.dim()
            handler = on_grad if dim == ndim else on_more if on_more and dim > ndim else None
            if handler is not None:
                return self._register_fast(entry, handler, saved[0], None, x.shape[0], output, x)
        B = self._batch_of(entry, module, args, kwargs)
        record = _Record(
            entry,
            (),
            {},
            (),
            (),
            B,
            self._count_uses(entry),
            spec,
            positions,
            (saved, in_spec),
            _changed(entry) if entry.buffers else None,
            _rng.recorded(entry.rng) if entry.dropout else None,
        )
        return self._register(record, outs, leaves, tuple(t for t in flat if isinstance(t, Tensor)))

    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of a parametrized module (its buffers' versions before the call)
        and of attention layers, recurrent layers and fallback modules (the generator states,
        when they may draw dropout masks: in training mode)."""
        entry = self._entries.get(module)
        if entry is None:
            return
        if entry.buffers:
            entry.versions = tuple(b._version for _, b in entry.buffers)
        if entry.rule.is_fallback:
            entry.state = (
                tuple(
                    (n, b, b._version)
                    for n, b in module.named_buffers()
                    if "parametrizations." not in n  # a parametrization's: Call.buffers
                )
                if torch.is_grad_enabled()
                else None
            )
        if entry.dropout:
            entry.rng = None
            if module.training and torch.is_grad_enabled() and (entry.rule.dropout(module)):
                first = args[0] if args else next(iter(kwargs.values()), None)
                if isinstance(first, PackedSequence):
                    first = first.data
                if not isinstance(first, Tensor):
                    first = next(
                        (t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)), None
                    )
                device = first.device if first is not None else torch.device("cpu")
                entry.rng = _rng.state(device)

    def _grad_hook(self, p: Tensor) -> None:
        if id(p) in self._params:  # not a copy of a tracked parameter (copy.deepcopy)
            self._begin().got_grad.add(id(p))

    def _begin(self) -> _Pass:
        """The state of the running backward pass, made by its first hook."""
        state = self._pass
        if state is not None:
            return state
        state = self._pass = _Pass()
        Variable._execution_engine.queue_callback(_PassEnd(self, state))
        versions = self._grad_versions
        cleared = state.cleared
        written: list[tuple[nn.Parameter, Tensor]] = []  # since the last pass: zeroed?
        unknown = self._unknown
        for pid, p in self._plist:
            g = p.grad
            if g is None:
                cleared[pid] = p
            else:
                v = versions.get(pid)
                if (v is not None and g._version != v) or (unknown and pid in unknown):
                    written.append((p, g))
        if written:
            for p in _zeroed(written):
                cleared[id(p)] = p
        # a gradient that was cleared (None, or zeroed in place) clears its statistic
        if cleared:
            self._unknown.difference_update(cleared)
            self._norms = []
            self._examples = 0
            self._passes = 0
        return state

    def _on_grads(self, record: _Record, grads: tuple[Tensor | None, ...]) -> None:
        if self._detached:
            return
        self._session = None
        try:
            self._on_grads_inner(record, grads)
        except BaseException:
            self._abort()
            raise

    def _abort(self, state: _Pass | None = None) -> None:
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

    def _on_fast_grad(self, on_grad: Any, record: tuple, nr: int, grads: tuple) -> None:
        """Output gradient of a call on a short path (``record`` = entry, input, its version,
        batch size, use counts, from :meth:`_fast_hook`): the checks of every call, then
        ``on_grad(state, record, d)`` unless the output got no gradient."""
        if self._detached:
            return
        self._session = None
        try:
            state = self._pass or self._begin()
            entry, x, version, B, uses = record
            if version is None:  # a SavedTensor (saved-tensor hooks): unpacked once, here
                x = _saved.unpack(x)
                record = (entry, x, x._version, B, uses)
            elif x._version != version:
                self._raise_modified(entry)
            if state.batch_size != B:
                self._check_batch(state, entry, B)
            d = grads[nr]
            if not B:
                self._empty(state, entry)
            elif d is not None:
                on_grad(state, record, d)
        except BaseException:
            self._abort()
            raise

    def _on_fast_view_grad(
        self, on_grad: Any, record: tuple, nr: int, shape: torch.Size, grads: tuple
    ) -> None:
        """:meth:`_on_fast_grad` for an output that reshapes the tensor ``grads[nr]`` is the
        gradient of."""
        g = grads[nr]
        self._on_fast_grad(on_grad, record, 0, (None if g is None else g.reshape(shape),))

    def _on_lane_grad(self, state: _Pass, record: tuple, d: Tensor) -> None:
        """A call for its fast path's lane (2-D ``nn.Linear``): stashed, computed in
        :meth:`_flush` together with the other such calls of the pass (fewer kernels and less
        Python per layer)."""
        self._stash(state, record, d, None, record[1].nbytes + d.nbytes)

    def _stash(self, state: _Pass, record: tuple, d: Tensor, moments: Any, nbytes: int) -> None:
        """Hold a call (``nbytes``: its input and output gradient) for :meth:`_flush`; the
        stash is flushed early when it holds more than ``memory_budget`` bytes."""
        state.stash.append((record, d, moments))
        held = state.stash_bytes = state.stash_bytes + nbytes
        if held > (self.memory_budget or _default_budget(d)):
            self._flush(state)

    def _on_moments_grad(self, moments: Any, state: _Pass, record: tuple, d: Tensor) -> None:
        """A call for ``moments`` (:func:`conv_moments`, :func:`linear_seq_moments`,
        :func:`norm_moments`): computed now, or with the Linear lane at the end of the pass if
        it is small (:data:`DEFER_BYTES`)."""
        nbytes = record[1].nbytes + d.nbytes
        if nbytes <= DEFER_BYTES:
            self._stash(state, record, d, moments, nbytes)
        else:
            self._moments_now(moments, state, record, d)

    def _moments_now(self, moments: Any, state: _Pass, record: tuple, d: Tensor) -> None:
        """One call computed by ``moments``, without the general path's bookkeeping; a shared
        parameter or a call too large for one chunk (``moments`` returns ``None``) takes the
        general rule."""
        entry, x, _, _, uses = record
        results = None
        if not _shared(entry, uses):
            results = _without_grad(
                moments,
                entry.module,
                x,
                d,
                state.scale,
                self.memory_budget or _default_budget(d),
                entry.has_weight,
                entry.has_bias,
            )
        if results is None:
            self._compute_general(state, record, d)
        else:
            self._set_moments(state, entry, results)

    def _compute_general(self, state: _Pass, record: tuple, d: Tensor) -> None:
        """A short-path call handed to its general rule (:meth:`_compute`)."""
        entry, x, version, B, uses = record
        args = (x,)
        self._compute(state, _Record(entry, args, {}, (version,), args, B, uses, None, (0,)), (d,))

    def _set_moments(self, state: _Pass, entry: _Entry, results: tuple[Tensor, ...]) -> None:
        """Record the moments of one call of ``entry`` (one per tracked parameter, in order)."""
        kinds, moments, contributed = state.kind, state.moments, state.contributed
        for pid, p, m in zip(entry.ids, entry.params, results, strict=True):
            if pid in kinds:  # another call in this pass: the general path checks it
                self._add(state, p, Contribution(m), entry.label)
            else:
                kinds[pid] = "moment"
                contributed.add(pid)
                moments[pid] = m

    def _flush(self, state: _Pass) -> None:
        """Compute the stashed calls: small short-path calls one by one, then the 2-D
        ``nn.Linear`` calls together (:func:`linear_moments`); calls of a shared parameter take
        the general rule (per-example gradients summed over uses)."""
        items, state.stash, state.stash_bytes = state.stash, [], 0
        lanes: dict[Any, tuple[list, list]] = {}
        for record, d, moments in items:
            if moments is not None:
                self._moments_now(moments, state, record, d)
                continue
            entry, x, _, _, uses = record
            if _shared(entry, uses):
                self._compute_general(state, record, d)
                continue
            calls, entries = lanes.setdefault(entry.fast.lane, ([], []))
            calls.append((entry.has_weight, entry.has_bias, entry.params[0].dtype, x, d))
            entries.append(entry)
        for lane, (calls, entries) in lanes.items():
            results = _without_grad(lane, calls, state.scale)
            for entry, moments_of_call in zip(entries, results, strict=True):
                self._set_moments(state, entry, moments_of_call)

    @staticmethod
    def _raise_modified(entry: _Entry) -> None:
        raise RuntimeError(
            f"an input of module {entry.label!r} was modified in place after its "
            "forward call; per-example statistics need the input as it was used"
        )

    def _check_batch(self, state: _Pass, entry: _Entry, B: int) -> None:
        if state.batch_size is None:
            state.batch_size = B
            state.first_module = entry.label
            N = self._batch_size or B
            state.scale = float(N) if self.reduction == "mean" else 1.0 / max(N, 1)
        elif state.batch_size != B:
            raise ValueError(
                f"inconsistent batch sizes in one backward pass: module {entry.label!r} has "
                f"batch dimension {B}, module {state.first_module!r} has {state.batch_size}. "
                "Inputs must put the batch first (batch_first=True for recurrent layers and "
                "attention), and a module called once for the whole batch and broadcast over it "
                "(a position embedding on arange(T)) has no per-example gradient: call it on a "
                "batched input (pos.expand(B, T))"
            )

    def _on_grads_inner(
        self, record: _Record, grads: tuple[Tensor | None, ...], state: _Pass | None = None
    ) -> None:
        if state is None:
            state = self._begin()
        entry = record.entry
        if record.saved is not None:
            record = _unpacked(record)
        for t, v in zip(record.inputs, record.versions):  # same length by construction
            if t._version != v:
                self._raise_modified(entry)
        self._check_batch(state, entry, record.batch_size)
        if not record.batch_size:
            self._empty(state, entry)
            return
        self._compute(state, record, grads)

    def _empty(self, state: _Pass, entry: _Entry) -> None:
        """A call on an empty batch: zero statistics for its parameters (no example)."""
        for p in entry.params:
            self._add(state, p, Contribution(per_example=p.new_zeros((0, *p.shape))), entry.label)

    def _compute(self, state: _Pass, record: _Record, grads: tuple[Tensor | None, ...]) -> None:
        """Run the entry's layer rule on one call and add its contributions."""
        entry = record.entry
        B = record.batch_size
        uses = record.uses
        materialize = _NONE
        if _shared(entry, uses):
            materialize = frozenset(
                n for n, i in zip(entry.names, entry.ids, strict=True) if uses[i] > 1
            )
        args = record.args
        outputs = record.outputs
        if entry.batch_dim:  # [T, B, ...] inputs and output gradients: the batch first
            args = tuple(a.movedim(1, 0) if isinstance(a, Tensor) else a for a in args)
            grads = tuple(g if g is None else g.movedim(1, 0) for g in grads)
            if outputs is not None:
                outputs = tuple((o.movedim(1, 0), v) for o, v in outputs)
        call = Call(
            module=entry.module,
            args=args,
            kwargs=record.kwargs,
            grads=grads,
            batch_size=B,
            param_names=entry.names,
            materialize=materialize,
            norms=self.per_example_norms,
            memory_budget=self.memory_budget or _default_budget(entry.params[0]),
            conv_strategy=self.conv_strategy,
            scale=state.scale,
            out_spec=record.out_spec,
            out_positions=record.positions,
            buffers=record.buffers,
            rng=record.rng,
            outputs=outputs,
        )
        self._suspended += 1
        try:
            if _saved.hooks() is None:
                contributions = _without_grad(entry.rule.compute, call)
            else:  # a backward pass inside a saved-tensor hooks block
                with _saved.without_hooks():
                    contributions = _without_grad(entry.rule.compute, call)
        finally:
            self._suspended -= 1
        label = entry.label
        for n, p in zip(entry.names, entry.params, strict=True):
            c = contributions.get(n)
            if c is not None:
                self._add(state, p, c, label)

    def _add(self, state: _Pass, p: nn.Parameter, c: Contribution, label: str) -> None:
        pid = id(p)
        kind = (
            "moment"
            if c.per_example is None and c.factors is None and c.rows is None
            else "per_example"
        )
        if pid in state.kind and (state.kind[pid] == "moment" or kind == "moment"):
            raise RuntimeError(
                f"parameter {self._params[pid][0]!r} received gradients from several module "
                "calls in one backward pass, but was used only once in the forward pass that "
                "recorded one of them. Run forward and backward in pairs, or call all uses in "
                "the same forward pass"
            )
        state.kind[pid] = kind
        state.contributed.add(pid)
        if c.factors is not None:  # the per-example gradient as outer-product factors
            state.factors.setdefault(pid, []).append(c.factors)
            return
        if c.rows is not None:  # the per-example gradient as sparse rows (lookup tables)
            state.rows.setdefault(pid, []).append(c.rows)
            return
        if c.per_example is not None:
            prev = state.pending.get(pid)
            state.pending[pid] = c.per_example if prev is None else prev + c.per_example
            return
        prev = state.moments.get(pid)
        state.moments[pid] = c.moment if prev is None else prev + c.moment
        if c.sq_norms is not None:
            state.norms = c.sq_norms if state.norms is None else state.norms + c.sq_norms

    def _inverse_scale_squared(self) -> Tensor | None:
        """``1 / scale**2`` of :attr:`grad_scaler` (``None``: no scaler, or one disabled), on
        the scaler's device where it keeps its scale there, so that no step waits for it."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)  # the scale tensor scaler.scale() multiplies by
        if not isinstance(scale, Tensor):
            scale = torch.tensor(float(scaler.get_scale()))
        return scale.double().reciprocal().square()

    def _finish(self) -> None:
        state, self._pass = self._pass, None
        self._uses = {}
        self._session = None
        if state is None:
            return
        try:
            self._finish_pass(state)
        except BaseException:
            _clear(state.cleared)
            raise

    def _finish_pass(self, state: _Pass) -> None:
        if state.stash:
            self._flush(state)
        cleared = state.cleared
        if cleared:  # statistics of cleared gradients that this pass does not replace
            _clear(
                {
                    k: p
                    for k, p in cleared.items()
                    if k not in state.moments
                    and k not in state.pending
                    and k not in state.factors
                    and k not in state.rows
                }
            )
        # the coverage check runs on the first pass that records a call (a pass of paused
        # forward calls records none: it can tell nothing)
        missing = None
        if self._coverage_handles and state.contributed:
            for h in self._coverage_handles:
                h.remove()
            self._coverage_handles = []
            missing = state.got_grad - state.contributed
            stray = sorted({f"{name} ({op})" for name, op in self._watch.used})
            self._watch.remove()
            if stray and not missing:
                raise ValueError(
                    f"parameters used outside a call of their module, in operations that reached "
                    f"the loss: {', '.join(stray)}; their per-example gradients through those "
                    "uses are not tracked, so the statistics would be wrong. Use the module "
                    "(for an output head tied to an embedding: an nn.Linear whose weight is the "
                    "embedding's), or a module that owns the parameter"
                )
        if missing:
            names = sorted(self._params[pid][0] for pid in missing)
            raise RuntimeError(
                f"parameters {names} received gradients that did not pass through a call of "
                "their module (used directly in the forward of another module?); their "
                "per-example statistics are unknown. Wrap the computation that uses them in a "
                "module that owns them"
            )
        if state.batch_size is None:
            return
        B = state.batch_size
        N = self._batch_size or B
        if self.reduction == "mean":
            scale, nscale = float(N), float(N) ** 2
        else:
            scale, nscale = 1.0 / max(N, 1), 1.0  # N = 0: an empty batch, nothing to scale
        for pid in {**state.factors, **state.rows}:
            p = self._params[pid][1]
            factors, rows = state.factors.get(pid, []), state.rows.get(pid, [])
            if pid in state.pending:  # also materialised uses: add these to them
                pe = state.pending[pid]
                for f in factors:
                    pe = pe + outer_per_example(f).view_as(pe)
                pe = pe.contiguous()
                for ex, row, vec in rows:
                    R = pe.shape[1]
                    pe.view(B * R, -1).index_add_(0, ex * R + row, vec.reshape(vec.shape[0], -1))
                state.pending[pid] = pe
                continue
            m, nb = outer_moments(
                factors,
                p.shape,
                scale,
                self.memory_budget or _default_budget(p),
                self.per_example_norms,
                B,
                rows,
            )
            state.moments[pid] = m
            if nb is not None:
                state.norms = nb if state.norms is None else state.norms + nb
        for pid, pe in state.pending.items():
            sq = pe * pe
            m = sq.sum(0).mul_(scale)
            prev = state.moments.get(pid)
            state.moments[pid] = m if prev is None else prev + m
            if self.per_example_norms:
                nb = sq.reshape(B, -1).sum(1) if B else sq.new_zeros(0)
                state.norms = nb if state.norms is None else state.norms + nb
        inv = self._inverse_scale_squared()
        if inv is not None:
            for m in state.moments.values():
                m.mul_(inv.to(m.device, m.dtype))
            if state.norms is not None:
                state.norms = state.norms * inv.to(state.norms.device, state.norms.dtype)
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
        self._examples += B
        self._passes += 1


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
