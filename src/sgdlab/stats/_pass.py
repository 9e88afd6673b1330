"""One backward pass of a tracker (:class:`Pass`): the per-example statistics its calls
contribute, summed over uses and reduced to second moments at its end.

Each call's rule gives, per parameter, a :class:`~sgdlab.stats._base.Contribution` of ``v_b``
(the per-example gradient of the summed loss): ``moment = scale * sum_b v_b^2`` where the call
is the parameter's only use, else per-example gradients, outer-product factors or sparse rows,
which :meth:`Pass.reduce` sums over the uses of each example before squaring:

    m = scale * sum_b (sum_uses v_b)^2,   scale = N (mean-reduced loss) or 1/N (summed)

so that ``m = (1/N) sum_b g_b^2`` with ``g_b = N v_b`` (mean) or ``g_b = v_b`` (sum).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import _saved
from ._base import Call, Contribution, outer_moments, outer_per_example, without_grad
from ._deferred import Deferred
from ._record import Entry, Record, shared, unpacked

__all__ = ["CPU_BUDGET", "DEVICE_BUDGET", "Pass", "PassEnd", "default_budget"]

CPU_BUDGET = 2**25  # default memory_budget for CPU tensors (bytes)
DEVICE_BUDGET = 2**27  # default memory_budget on accelerators (bytes)

_NONE: frozenset[str] = frozenset()


def default_budget(t: Tensor) -> int:
    """The default ``memory_budget`` for tensors like ``t``."""
    return CPU_BUDGET if t.is_cpu else DEVICE_BUDGET


class Pass:
    """State of one backward pass of ``tracker`` (a plain class: one is made per pass)."""

    __slots__ = (
        "tracker",
        "batch_size",
        "moments",
        "pending",
        "kind",
        "norms",
        "got_grad",
        "contributed",
        "first_module",
        "scale",
        "deferred",
        "cleared",
        "factors",
        "rows",
    )

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker  # its options: reduction, batch_size, memory_budget, norms...
        self.batch_size: int | None = None
        self.moments: dict[int, Tensor] = {}
        self.pending: dict[int, Tensor] = {}
        self.kind: dict[int, str] = {}
        self.norms: Tensor | None = None
        self.got_grad: set[int] = set()
        self.contributed: set[int] = set()
        self.first_module = ""
        self.scale = 1.0
        self.deferred = Deferred()  # short-path calls held for the end of the pass
        # parameters whose gradient was cleared since the last pass: their statistic restarts
        # (replaced at the end of the pass, or removed if this pass gives it nothing)
        self.cleared: dict[int, nn.Parameter] = {}
        # per-example gradients of shared parameters as outer-product factors, per use
        self.factors: dict[int, list[tuple[Tensor, Tensor]]] = {}
        # per-example gradients of shared lookup tables as sparse rows, per use
        self.rows: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}

    def budget(self, like: Tensor) -> int:
        """The tracker's ``memory_budget`` for tensors like ``like``."""
        return self.tracker.memory_budget or default_budget(like)

    # ------------------------------------------------------------- each call
    def check_batch(self, entry: Entry, B: int) -> None:
        """The first call sets the pass's batch size (and ``scale``); the others must agree."""
        if self.batch_size is None:
            self.batch_size = B
            self.first_module = entry.label
            N = self.tracker.batch_size or B
            self.scale = float(N) if self.tracker.reduction == "mean" else 1.0 / max(N, 1)
        elif self.batch_size != B:
            raise ValueError(
                f"inconsistent batch sizes in one backward pass: module {entry.label!r} has "
                f"batch dimension {B}, module {self.first_module!r} has {self.batch_size}: put "
                "the batch first (batch_first=True), and call a module shared by the batch on "
                "a batched input (pos.expand(B, T))"
            )

    def on_grads(self, record: Record, grads: tuple[Tensor | None, ...]) -> None:
        """The output gradients of a call on the general path: its checks, then its rule."""
        entry = record.entry
        if record.saved is not None:
            record = unpacked(record)
        for t, v in zip(record.inputs, record.versions):  # same length by construction
            if t._version != v:
                raise_modified(entry)
        self.check_batch(entry, record.batch_size)
        if not record.batch_size:
            self.empty(entry)
            return
        self.compute(record, grads)

    def empty(self, entry: Entry) -> None:
        """A call on an empty batch: zero statistics for its parameters (no example)."""
        for p in entry.params:
            self.add(p, Contribution(per_example=p.new_zeros((0, *p.shape))), entry.label)

    def compute(self, record: Record, grads: tuple[Tensor | None, ...]) -> None:
        """Run the entry's layer rule on one call and add its contributions."""
        entry = record.entry
        tracker = self.tracker
        uses = record.uses
        materialize = _NONE
        if shared(entry, uses):
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
            batch_size=record.batch_size,
            param_names=entry.names,
            materialize=materialize,
            norms=tracker.per_example_norms,
            memory_budget=self.budget(entry.params[0]),
            conv_strategy=tracker.conv_strategy,
            scale=self.scale,
            out_spec=record.out_spec,
            out_positions=record.positions,
            buffers=record.buffers,
            rng=record.rng,
            outputs=outputs,
        )
        tracker._suspended += 1  # a rule that reruns the module records no call
        try:
            if _saved.hooks() is None:
                contributions = without_grad(entry.rule.compute, call)
            else:  # a backward pass inside a saved-tensor hooks block
                with _saved.without_hooks():
                    contributions = without_grad(entry.rule.compute, call)
        finally:
            tracker._suspended -= 1
        label = entry.label
        for n, p in zip(entry.names, entry.params, strict=True):
            c = contributions.get(n)
            if c is not None:
                self.add(p, c, label)

    def compute_general(self, record: Record, d: Tensor) -> None:
        """A short-path call handed to its general rule (:meth:`compute`)."""
        self.compute(record, (d,))

    def moments_now(self, moments: Any, record: Record, d: Tensor) -> None:
        """One short-path call computed by ``moments``, without the general path's
        bookkeeping; a shared parameter or a call too large for one chunk (``moments`` returns
        ``None``) takes the general rule."""
        entry = record.entry
        results = None
        if not shared(entry, record.uses):
            results = without_grad(
                moments,
                entry.module,
                record.args[0],
                d,
                self.scale,
                self.budget(d),
                entry.has_weight,
                entry.has_bias,
            )
        if results is None:
            self.compute_general(record, d)
        else:
            self.set_moments(entry, results)

    def set_moments(self, entry: Entry, results: tuple[Tensor, ...]) -> None:
        """Record the moments of one call of ``entry`` (one per tracked parameter, in order)."""
        kinds, moments, contributed = self.kind, self.moments, self.contributed
        for pid, p, m in zip(entry.ids, entry.params, results, strict=True):
            if pid in kinds:  # another call in this pass: the general path checks it
                self.add(p, Contribution(m), entry.label)
            else:
                kinds[pid] = "moment"
                contributed.add(pid)
                moments[pid] = m

    def add(self, p: nn.Parameter, c: Contribution, label: str) -> None:
        """Add one call's contribution to parameter ``p``."""
        pid = id(p)
        kind = (
            "moment"
            if c.per_example is None and c.factors is None and c.rows is None
            else "per_example"
        )
        if pid in self.kind and (self.kind[pid] == "moment" or kind == "moment"):
            raise RuntimeError(
                f"parameter {self.tracker._params[pid][0]!r} received gradients from several "
                "module calls in one backward pass, but was used only once in the forward pass "
                "that recorded one of them. Run forward and backward in pairs, or call all uses "
                "in the same forward pass"
            )
        self.kind[pid] = kind
        self.contributed.add(pid)
        if c.factors is not None:  # the per-example gradient as outer-product factors
            self.factors.setdefault(pid, []).append(c.factors)
            return
        if c.rows is not None:  # the per-example gradient as sparse rows (lookup tables)
            self.rows.setdefault(pid, []).append(c.rows)
            return
        if c.per_example is not None:
            prev = self.pending.get(pid)
            self.pending[pid] = c.per_example if prev is None else prev + c.per_example
            return
        prev = self.moments.get(pid)
        self.moments[pid] = c.moment if prev is None else prev + c.moment
        if c.sq_norms is not None:
            self.norms = c.sq_norms if self.norms is None else self.norms + c.sq_norms

    # ---------------------------------------------------------------- the end
    def replaced(self) -> set[int]:
        """The parameters this pass gives a statistic."""
        return {*self.moments, *self.pending, *self.factors, *self.rows}

    def reduce(self, params: dict[int, tuple[str, nn.Parameter]], inv: Tensor | None) -> float:
        """Turn every contribution into ``moments[pid]`` (the module docstring's ``m``) and
        ``norms`` (``||v_b||^2``), both times ``inv`` (``1 / loss scale**2``) if given;
        returns the factor that turns ``norms`` into ``||g_b||^2``."""
        B = self.batch_size
        N = self.tracker.batch_size or B
        norms = self.tracker.per_example_norms
        if self.tracker.reduction == "mean":
            scale, nscale = float(N), float(N) ** 2
        else:
            scale, nscale = 1.0 / max(N, 1), 1.0  # N = 0: an empty batch, nothing to scale
        for pid in {**self.factors, **self.rows}:
            p = params[pid][1]
            factors, rows = self.factors.get(pid, []), self.rows.get(pid, [])
            if pid in self.pending:  # also materialised uses: add these to them
                pe = self.pending[pid]
                for f in factors:
                    pe = pe + outer_per_example(f).view_as(pe)
                pe = pe.contiguous()
                for ex, row, vec in rows:
                    R = pe.shape[1]
                    pe.view(B * R, -1).index_add_(0, ex * R + row, vec.reshape(vec.shape[0], -1))
                self.pending[pid] = pe
                continue
            m, nb = outer_moments(factors, p.shape, scale, self.budget(p), norms, B, rows)
            self.moments[pid] = m
            if nb is not None:
                self.norms = nb if self.norms is None else self.norms + nb
        for pid, pe in self.pending.items():
            sq = pe * pe
            m = sq.sum(0).mul_(scale)
            prev = self.moments.get(pid)
            self.moments[pid] = m if prev is None else prev + m
            if norms:
                nb = sq.reshape(B, -1).sum(1) if B else sq.new_zeros(0)
                self.norms = nb if self.norms is None else self.norms + nb
        if inv is not None:
            for m in self.moments.values():
                m.mul_(inv.to(m.device, m.dtype))
            if self.norms is not None:
                self.norms = self.norms * inv.to(self.norms.device, self.norms.dtype)
        return nscale


class PassEnd:
    """The end-of-pass callback queued on the autograd engine by a pass's first hook. A
    backward pass that fails (an exception in a tensor hook or a custom Function's backward,
    anomaly mode's NaN check, a KeyboardInterrupt) drops its queued callbacks unrun: the engine
    releases this object then, before the exception reaches the caller, and its deletion aborts
    the pass (:meth:`~sgdlab.stats.tracker.Tracker._abort`)."""

    __slots__ = ("tracker", "state", "ran")

    def __init__(self, tracker: Any, state: Pass) -> None:
        self.tracker, self.state, self.ran = tracker, state, False

    def __call__(self) -> None:
        self.ran = True
        self.tracker._finish()

    def __del__(self) -> None:
        if not self.ran:
            self.tracker._abort(self.state)


def raise_modified(entry: Entry) -> None:
    """Refuse a call whose input was modified in place after the call."""
    raise RuntimeError(
        f"an input of module {entry.label!r} was modified in place after its "
        "forward call; per-example statistics need the input as it was used"
    )


def inverse_scale_squared(scaler: Any) -> Tensor | None:
    """``1 / scale**2`` of a ``GradScaler`` (``None``: no scaler, or one disabled), on the
    scaler's device where it keeps its scale there, so that no step waits for it."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)  # the scale tensor scaler.scale() multiplies by
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scaler.get_scale()))
    return scale.double().reciprocal().square()
