"""The fused step of any :class:`~sgdlab.optim._fast.kernel.FusedKernel`: flat buffers per
(param group, device, dtype), one kernel launch each, held by one :class:`FusedState` per
optimizer (``optimizer._fused``).

:meth:`FusedState.update` either performs the whole step of a param group and returns
``True``, or changes no value and returns ``False`` (the caller then takes the
foreach/reference path on the same views). It declines when a parameter is not contiguous or
not floating point, a gradient is sparse, a ``"kernel"`` state entry exists for some
parameters only, or the kernel declines (:meth:`FusedKernel.accepts` / ``adopt``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from sgdlab.optim._common import group_indices, scalar_dtype
from sgdlab.optim._fast import _config
from sgdlab.optim._fast.flat import FlatGroup
from sgdlab.optim._fast.kernel import FusedKernel, Options, get_kernel, pack_scalars

__all__ = ["FusedState", "run_kernel"]


def run_kernel(
    kernel: FusedKernel, opts: Options, args: tuple, device: torch.device, dtype: torch.dtype
) -> None:
    """Run ``kernel``'s variant ``opts`` on ``args``: compiled unless compilation is switched
    off or failed (then the same function runs eagerly, after a one-time warning). The first
    call of each variant records its time, compilation included, in
    :data:`sgdlab.optim._fast.COMPILE_SECONDS`."""
    if not _config.compile_enabled():
        get_kernel(kernel, opts, False)(*args)
        return
    variant = (kernel.name, opts, device.type, dtype, tuple(a is None for a in args))
    if variant in _config.COMPILE_SECONDS:
        get_kernel(kernel, opts, True)(*args)
        return
    t0 = time.perf_counter()
    try:
        get_kernel(kernel, opts, True)(*args)
    except Exception as exc:  # compilation failed (no C++ compiler, unsupported backend)
        _config.disable_compile(f"{type(exc).__name__}: {exc}")
        warnings.warn(
            "sgdlab fused optimizers: torch.compile failed; fused kernels run eagerly from now "
            f"on ({type(exc).__name__}: {str(exc)[:120]}). On CPU inductor needs gcc or clang.",
            RuntimeWarning,
            stacklevel=4,
        )
        get_kernel(kernel, opts, False)(*args)
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _config.COMPILE_SECONDS[variant] = time.perf_counter() - t0


class _Entry:
    """A param group's flat buffers and the parameter list / state entries they were built
    for (a step with the same ones reuses them without per-parameter checks)."""

    __slots__ = ("params", "keys", "fgs")

    def __init__(self, params: list[torch.Tensor], keys: tuple, fgs: list[FlatGroup]) -> None:
        self.params, self.keys, self.fgs = params, keys, fgs

    def holds(self, params: list[torch.Tensor], keys: tuple) -> bool:
        if keys != self.keys or len(params) != len(self.params):
            return False
        for p, q in zip(params, self.params):
            if p is not q:
                return False
        return all(fg.intact() for fg in self.fgs)


def _usable_grads(params: list[torch.Tensor]) -> bool:
    for p in params:
        g = p.grad
        if g is None or g.is_sparse or g.shape != p.shape or g.dtype != p.dtype:
            return False
    return True


class FusedState:
    """The fused path's flat buffers of one optimizer, keyed by param group; the one owner of
    them. :meth:`drop` forgets them (after writing device-side counters back into the state),
    and the next fused step rebuilds them from the parameters and state as they are then."""

    def __init__(self, kernel: FusedKernel | None) -> None:
        self.kernel = kernel
        self.entries: dict[int, _Entry] = {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def sync(self) -> None:
        """Write every flat group's device-side counters into the optimizer state."""
        for entry in self.entries.values():
            self._sync(entry)

    def _sync(self, entry: _Entry) -> None:
        if self.kernel is not None:
            for fg in entry.fgs:
                self.kernel.sync(fg)

    def drop(self, group: dict | None = None) -> None:
        """Forget the flat buffers of ``group`` (all groups when ``None``)."""
        if group is None:
            self.sync()
            self.entries.clear()
        elif id(group) in self.entries:
            self._sync(self.entries.pop(id(group)))

    def _build(
        self, state: dict, params: list[torch.Tensor], keys: dict[str, str], capturable: bool
    ) -> list[FlatGroup] | None:
        assert self.kernel is not None
        fgs = []
        for idx in group_indices(params):
            ps = [params[i] for i in idx]
            if any(not p.is_floating_point() or not p.is_contiguous() for p in ps):
                return None
            for key, init in keys.items():
                if init == "kernel" and len({p in state and key in state[p] for p in ps}) > 1:
                    return None
            fg = FlatGroup(ps, state, keys)
            if self.kernel.counts_steps:
                fg.adopt_steps(state, scalar_dtype(), on_device=capturable)
            fgs.append(fg)
        return fgs

    def _prepare(
        self, state: dict, group: dict, hp: dict, params: list[torch.Tensor]
    ) -> list[FlatGroup] | None:
        """The group's flat buffers (reused, or built from the current parameters and state)
        with the gradients gathered into them; ``None`` (nothing changed) when the fused step
        does not apply."""
        assert self.kernel is not None
        keys = self.kernel.keys(hp)
        names = tuple(keys)
        entry = self.entries.get(id(group))
        if entry is None or not entry.holds(params, names):
            if entry is not None:  # device-side counters go back to the state first
                self._sync(entry)
            if not _usable_grads(params) or not self.kernel.accepts(state, params):
                return None
            fgs = self._build(state, params, keys, bool(group.get("capturable")))
            if fgs is None:
                return None
            entry = _Entry(list(params), names, fgs)
            self.entries[id(group)] = entry
        if not all(fg.grads_usable() for fg in entry.fgs):
            return None
        if not all(self.kernel.adopt(fg) for fg in entry.fgs):
            return None
        for fg in entry.fgs:
            fg.gather_grads()
            if fg.flat_master is not None:
                fg.sync_master()
        return entry.fgs

    def update(
        self, opt: Any, group: dict, hp: dict, params: list[torch.Tensor], enabled: bool
    ) -> bool:
        """Perform ``group``'s step on flat buffers when ``enabled`` and possible (``True``),
        or leave everything unchanged (``False``) and drop the group's flat buffers, since the
        caller's per-tensor path is about to update the state."""
        if enabled and params and self.kernel is not None and _step(self, opt, group, hp, params):
            return True
        self.drop(group)
        return False

    def grads_all_finite(self, opt: Any) -> bool:
        """One sum per flat gradient buffer: ``True`` when every gradient is finite and the
        flat buffers of all param groups already exist (gradients are gathered into them,
        which the step does anyway); ``False`` when a gradient is not finite or the quick
        check does not apply (the caller then runs its per-tensor check, which also names the
        offender)."""
        if not self.entries:
            return False
        fgs = []
        for group in opt.param_groups:
            if not group.get("fused") or group.get("second_moment") == "per_example":
                return False
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            entry = self.entries.get(id(group))
            if entry is None or not entry.holds(params, entry.keys):
                return False
            if not all(fg.grads_usable() for fg in entry.fgs):
                return False
            fgs.extend(entry.fgs)
        if not fgs:
            return False
        for fg in fgs:
            fg.gather_grads()
        # A sum is finite only if every term is (inf and NaN propagate; inf - inf is NaN), so
        # one plain reduction per buffer screens exactly for non-finite gradients at the cost
        # of reading them once. A finite sum proves all finite; a sum that overflows (terms
        # near the float limit) only sends the caller to its per-tensor check.
        sums = [_sum_of(fg.flat_grad) for fg in fgs]
        device = sums[0].device
        return bool(torch.isfinite(torch.stack([t.to(device) for t in sums])).all())


def _sum_of(g: torch.Tensor) -> torch.Tensor:
    """The sum of a flat buffer, accumulated in float32 at least (half-precision sums would
    overflow long before their elements do)."""
    if g.dtype in (torch.float16, torch.bfloat16):
        return g.sum(dtype=torch.float32)
    return g.sum()


def _packer(
    kernel: FusedKernel, values: dict[str, float], fg: FlatGroup
) -> Callable[[], torch.Tensor]:
    return lambda: pack_scalars(kernel, values, fg.state_dtype, fg.device)


def _second_moment(p: torch.Tensor) -> torch.Tensor:
    return p.grad_second_moment  # type: ignore[attr-defined]  # set by sgdlab.stats


@torch._disable_dynamo  # imports dynamo at the first call, not with sgdlab
def _step(fused: FusedState, opt: Any, group: dict, hp: dict, params: list[torch.Tensor]) -> bool:
    """One fused step of ``group``; ``False`` (nothing changed) when it does not apply.

    Under ``torch.compile`` of a whole training step this runs outside the traced graph (its
    host-side bookkeeping would recompile at every step), and its kernel runs compiled."""
    kernel = fused.kernel
    assert kernel is not None
    fgs = fused._prepare(opt.state, group, hp, params)
    if fgs is None:
        return False
    per_example = group.get("second_moment") == "per_example"
    capturable = bool(group.get("capturable"))
    for fg in fgs:
        m2 = fg.gather(_second_moment) if per_example else None
        opts = kernel.options(hp, fg)
        values = kernel.values(hp, fg)
        if capturable:
            sc = fg.cached("sc", tuple(sorted(values.items())), _packer(kernel, values, fg))
        else:
            if kernel.counts_steps:
                fg.steps.add_(1)
            sc = pack_scalars(kernel, values, fg.state_dtype, fg.device)
        bufs = tuple(fg.flat_state.get(k) for k in kernel.buffers)
        args = (fg.flat_param, fg.flat_grad, *bufs, m2, fg.flat_master, sc)
        run_kernel(kernel, opts, args + kernel.extra_args(hp, fg), fg.device, fg.dtype)
        fg.finish_fresh(opt.state)
    return True
