"""Flat contiguous buffers behind a param group's parameters, gradients and state.

For one (param group, device, dtype) and the parameters that have a gradient, a
:class:`FlatGroup` allocates one contiguous buffer for the parameters and one per state entry,
copies the current values in, and re-points every ``p.data`` and every
``optimizer.state[p][key]`` at a view into those buffers. Parameters, ``state_dict`` and
``load_state_dict`` keep working on the views, and a kernel can update the whole group with one
pass over each buffer.

Gradients: a flat gradient buffer holds one view per parameter. When ``p.grad`` is that view
(the optimizer re-points it after each copy, so a backward with
``zero_grad(set_to_none=False)`` accumulates straight into the buffer) nothing is copied;
otherwise (``set_to_none=True``, torch's default, or a gradient set by hand) the gradients are
copied in before the step with one ``torch._foreach_copy_``.

Low precision (bfloat16/float16 parameters): the state is float32 and a float32 master copy of
the parameters is kept in ``state[p]["master_param"]``; the parameter is the master rounded to
its dtype after every step. A parameter written in place since the last step
(``model.load_state_dict``, ``p.copy_``/``p.clamp_`` under ``no_grad``: its version counter
moved) gets its master re-initialised from it before the next step (:meth:`FlatGroup.
sync_master`), and so does a master that no longer rounds to the parameter when the buffers
are rebuilt. Writes through ``p.data`` do not move the version counter and are not seen (the
step would write the old weights back): write to ``p`` itself under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FlatGroup", "LOW_PRECISION", "state_dtype_for"]

LOW_PRECISION = (torch.bfloat16, torch.float16)


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """float32 state for bfloat16/float16 parameters, else the parameters' dtype."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in params:
        n = p.numel()
        out.append(flat[offset : offset + n].view(p.shape))
        offset += n
    return out


class FlatGroup:
    """Flat buffers for ``params`` (one device and dtype, all contiguous).

    Args:
        params: the parameters (each with a gradient), in the param group's order.
        state: the optimizer's state (``optimizer.state``).
        keys: state entries to hold flat, each with how a missing entry starts: ``"zeros"``,
            or ``"kernel"`` (written in full by the first step, e.g. SGD's momentum buffer,
            which starts as the first gradient; an entry is then either present for all
            parameters or for none).
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        state: dict,
        keys: dict[str, str],
    ) -> None:
        self.params = list(params)
        p0 = self.params[0]
        self.device, self.dtype = p0.device, p0.dtype
        self.state_dtype = state_dtype_for(self.dtype)
        self.numel = sum(p.numel() for p in self.params)
        self.keys = dict(keys)
        with torch.no_grad():
            self.flat_param = torch.empty(self.numel, dtype=self.dtype, device=self.device)
            views = _views(self.flat_param, self.params)
            torch._foreach_copy_(views, [p.detach() for p in self.params])
            for p, v in zip(self.params, views):
                p.data = v
            self.data_ptrs = [p.data_ptr() for p in self.params]
            self.flat_grad = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            self.grad_views = _views(self.flat_grad, self.params)
            self.flat_state: dict[str, torch.Tensor] = {}
            self.fresh: dict[str, bool] = {}
            self._pending: dict[str, list[torch.Tensor]] = {}
            for key, init in self.keys.items():
                self._adopt(state, key, init)
            self.flat_master: torch.Tensor | None = None
            if self.dtype in LOW_PRECISION:
                self._adopt_master(state)
        #: the parameters' state dicts, for per-step host-side entries without hashing
        self.state_dicts = [state[p] for p in self.params]
        self.flat_m2: torch.Tensor | None = None
        self.m2_views: list[torch.Tensor] = []
        #: the step counts (:meth:`adopt_steps`), for kernels that count steps
        self.steps = torch.zeros(0)
        #: host-side state of the kernel that steps this group (its own type; e.g. Adam's
        #: debiasing products); ``None`` until the kernel adopts the group
        self.host: Any = None
        #: device tensors rebuilt only when their values change (:meth:`cached`)
        self.device_cache: dict[str, tuple[Any, torch.Tensor]] = {}

    def _adopt(self, state: dict, key: str, init: str) -> None:
        have = [state[p].get(key) if p in state else None for p in self.params]
        present = [t is not None for t in have]
        flat = torch.zeros(self.numel, dtype=self.state_dtype, device=self.device)
        views = _views(flat, self.params)
        if any(present):
            torch._foreach_copy_(
                [v for v, t in zip(views, have) if t is not None],
                [t for t in have if t is not None],
            )
        self.flat_state[key] = flat
        # A "kernel" entry absent everywhere is written by the first step.
        self.fresh[key] = init == "kernel" and not any(present)
        if not self.fresh[key]:
            for p, v in zip(self.params, views):
                state[p][key] = v
        self._pending[key] = views

    def _adopt_master(self, state: dict) -> None:
        flat = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        views = _views(flat, self.params)
        for p, v in zip(self.params, views):
            old = state[p].get("master_param") if p in state else None
            if old is not None and old.shape == p.shape and torch.equal(old.to(p.dtype), p):
                v.copy_(old)
            else:
                v.copy_(p.detach())
            state[p]["master_param"] = v
        self.flat_master = flat
        self.master_views = views
        self.versions = [p._version for p in self.params]

    def sync_master(self) -> None:
        """Re-initialise the master copy of every parameter written in place since the last
        step (its version counter moved; the kernel writes the flat buffer, not ``p``, so its
        own writes do not move it)."""
        versions = self.versions
        stale = [i for i, p in enumerate(self.params) if p._version != versions[i]]
        if not stale:
            return
        with torch.no_grad():
            torch._foreach_copy_(
                [self.master_views[i] for i in stale], [self.params[i].detach() for i in stale]
            )
        for i in stale:
            versions[i] = self.params[i]._version

    def adopt_steps(self, state: dict, dtype: torch.dtype, on_device: bool = False) -> list[float]:
        """Hold every parameter's ``state[p]["step"]`` (0 when absent) in one tensor, so a
        step advances them all with one add: on the CPU (the host keeps the count), or on the
        parameters' device for capturable steps (the kernel advances it); returns the counts
        found."""
        found = []
        for p in self.params:
            t = state[p].get("step") if p in state else None
            found.append(float(t.item()) if isinstance(t, torch.Tensor) else float(t or 0.0))
        self.steps = torch.tensor(found, dtype=dtype, device=self.device if on_device else "cpu")
        for i, p in enumerate(self.params):
            state[p]["step"] = self.steps[i]
        return found

    def finish_fresh(self, state: dict) -> None:
        """Publish the views of entries the first step has just written."""
        for key, fresh in self.fresh.items():
            if fresh:
                for p, v in zip(self.params, self._pending[key]):
                    state[p][key] = v
                self.fresh[key] = False

    def cached(self, name: str, values: Any, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The device tensor ``name``, rebuilt by ``make()`` only when ``values`` change: a
        capturable step sends nothing from the host while its hyperparameters stay the same."""
        held = self.device_cache.get(name)
        if held is None or held[0] != values:
            held = (values, make())
            self.device_cache[name] = held
        return held[1]

    def intact(self) -> bool:
        """Whether every parameter still lives in the flat buffer (``p.data`` was not
        re-pointed from outside, e.g. by ``module.to``)."""
        for p, ptr in zip(self.params, self.data_ptrs):
            if p.data_ptr() != ptr:
                return False
        return True

    def grads_usable(self) -> bool:
        """Whether every gradient that is not already a view of the flat buffer can be copied
        into it (dense, of the parameter's shape and dtype)."""
        for p, v in zip(self.params, self.grad_views):
            g = p.grad
            if g is not v and (
                g is None or g.is_sparse or g.shape != p.shape or g.dtype != p.dtype
            ):
                return False
        return True

    def gather_grads(self) -> None:
        """Make the flat gradient buffer hold the current gradients (copying only those that
        are not already its views) and re-point ``p.grad`` at the views."""
        stale = [i for i, p in enumerate(self.params) if p.grad is not self.grad_views[i]]
        if not stale:
            return
        with torch.no_grad():
            # one multi-tensor copy: reads the gradients once, writes the flat buffer once
            torch._foreach_copy_(
                [self.grad_views[i] for i in stale],
                [self.params[i].grad for i in stale],  # type: ignore[misc]
            )
        for i in stale:
            grad = self.params[i].grad
            assert grad is not None  # grads_usable() came first
            # A gradient that is itself a view of another buffer (DDP's gradient buckets with
            # gradient_as_bucket_view=True) stays where its owner expects it.
            if grad._base is None:
                self.params[i].grad = self.grad_views[i]

    def gather(self, get: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Copy ``get(p)`` of every parameter (e.g. ``p.grad_second_moment``) into a flat
        buffer of the state dtype and return it."""
        if self.flat_m2 is None:
            self.flat_m2 = torch.empty(self.numel, dtype=self.state_dtype, device=self.device)
            self.m2_views = _views(self.flat_m2, self.params)
        with torch.no_grad():
            torch._foreach_copy_(self.m2_views, [get(p) for p in self.params])
        return self.flat_m2


def restore_float32_state(opt: Any, state_dict: dict) -> None:
    """Undo ``Optimizer.load_state_dict``'s cast of float32 state to the dtype of a
    bfloat16/float16 parameter (the fused path keeps such state, and the master copy, in
    float32), so a resume continues bit-identically."""
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, params):
        if p.dtype not in LOW_PRECISION:
            continue
        for key, value in state_dict["state"].get(pid, {}).items():
            if (
                key != "step"
                and isinstance(value, torch.Tensor)
                and value.dtype == torch.float32
                and value.shape == p.shape
            ):
                opt.state[p][key] = value.to(device=p.device, copy=True)
