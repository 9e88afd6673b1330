"""The forward side of a tracker (:class:`Recorder`): each call of a tracked module is
recorded (its inputs, batch size, the use counts of its parameters) and its output gradients
are listened for, on a short path (:class:`~sgdlab.stats._registry.FastPath`) or the general
one; :class:`~sgdlab.stats.tracker.Tracker` receives them."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import _rng, _saved, _tap
from ._record import Entry, Record, changed, check_state, differentiable, positional
from ._registry import first_dim

__all__ = ["Recorder"]

# the autograd engine's running graph task (-1: none); a call recorded while one runs is a
# reentrant checkpoint's recomputation (:meth:`Tracker._recomputed_call`)
_graph_task = getattr(torch._C, "_current_graph_task_id", lambda: -1)

# the level of the innermost torch.func transform (vmap, grad, ...) running, None outside any:
# forward calls inside one (per-example gradients computed by the user, functional training
# loops) act on functional parameters and batched tensors, not on a batch the tracker records
_transform_level = torch._C._functorch.maybe_current_level


class Recorder:
    """The forward hooks of :class:`~sgdlab.stats.tracker.Tracker` (a base class of it)."""

    def _fast_hook(self, entry: Entry, on_grad: Any, ndim: int, on_more: Any = None) -> Any:
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

    def _count_uses(self, entry: Entry) -> dict[int, int]:
        """One more call of ``entry``'s parameters in this forward pass; the use counts."""
        uses = self._uses
        if _graph_task() != -1:
            self._recomputed_call(entry, uses)
        for pid in entry.ids:
            uses[pid] = uses.get(pid, 0) + 1
        return uses

    def _recomputed_call(self, entry: Entry, uses: dict[int, int]) -> None:
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
                    "reentrant checkpoint and elsewhere in the pass, whose per-example gradients "
                    "cannot be summed before squaring: use checkpoint(..., use_reentrant=False)"
                )
            session.add(pid)
        if self._pass is None:
            self._begin()

    def _register_fast(
        self,
        entry: Entry,
        handler: Any,
        x: Any,
        version: int | None,
        B: int,
        output: Tensor,
        live: Tensor,
    ) -> Tensor | None:
        """A call on a short path: a pre-hook on the output's node hands its :class:`Record` to
        :meth:`_on_fast_grad` (``x`` a SavedTensor and ``version`` None under saved-tensor
        hooks; ``live`` the input itself). An output that
        is a view is listened for where an in-place operation on it cannot hide its gradient
        (:mod:`sgdlab.stats._tap`); returns the replacement output, if any."""
        if version is None:  # under saved-tensor hooks: x is a SavedTensor
            record = Record(entry, (), {}, (), (), B, self._count_uses(entry), None, (0,), x)
        else:
            args = (x,)
            uses = self._count_uses(entry)
            record = Record(entry, args, {}, (version,), args, B, uses, None, (0,))
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
    def _batch_of(entry: Entry, module: nn.Module, args: tuple, kwargs: dict) -> int:
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
            check_state(entry)
        if kwargs:
            args, kwargs = positional(module, args, kwargs)
        found = differentiable(output)
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
        record = Record(
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
            record.buffers = changed(entry)
        if entry.dropout:
            record.rng = _rng.recorded(entry.rng)
        if entry.rule.is_fallback:  # its rerun is checked against them
            record.outputs = tuple((o.detach(), o._version) for o in outs)
        return self._register(record, outs, leaves)

    def _register(
        self,
        record: Record,
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
        found = differentiable(output)
        if found is None:
            return None
        outs, positions, spec, leaves = found
        active = _saved.hooks()
        if kwargs:
            args, kwargs = positional(module, args, kwargs)
        flat, in_spec = tree_flatten((args, kwargs))
        saved = [_saved.save(t) if isinstance(t, Tensor) else t for t in flat]
        if self._suspended or _saved.recomputing(active):
            return None
        if entry.state:
            check_state(entry)
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
        record = Record(
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
            changed(entry) if entry.buffers else None,
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
