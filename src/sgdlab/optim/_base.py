"""The thin adapter shared by sgdlab's optimizers: batch size, scaling rule, validation,
non-finite gradients, and the choice between the reference and the foreach path.

Each concrete optimizer supplies ``_hyper_of(group)`` / ``_with_hyper(group, step)`` (how its
per-step hyperparameters map to :class:`sgdlab.hyper.PerStep`), ``_momentum_form`` and
``_update_group(group, hyper, foreach)`` (the pure update rule applied to one param group).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from sgdlab import hyper as _hyper
from sgdlab._validation import check_batch_size, check_choice, check_finite, check_nonnegative
from sgdlab.optim._common import group_indices, scalar_dtype
from sgdlab.optim._fast import FusedKernel, FusedState, grads_all_finite
from sgdlab.optim._fast.flat import restore_float32_state

__all__ = [
    "BatchScaledOptimizer",
    "NonFiniteGradientError",
    "NONFINITE_POLICIES",
    "check_hyper",
    "check_param_dtypes",
    "check_sparse",
    "check_torch_only_flags",
    "group_indices",
    "hyper_scalar",
    "plain_hyperparameters",
    "scalar_dtype",
]

NONFINITE_POLICIES = ("raise", "skip", "ignore")


class NonFiniteGradientError(FloatingPointError):
    """A gradient (or per-example second moment) holds NaN or inf; raised before any update,
    so parameters and optimizer state are untouched."""


def hyper_scalar(name: str, value: Any) -> float:
    """A hyperparameter as a Python float, for validation and for the step.

    Accepts what torch.optim accepts: a real number (numpy's scalars too; a bool is not one)
    or a 1-element real tensor of any number of dimensions (read with ``.item()``, so a
    scheduler that fills it in place is seen at the next step)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"{name} given as a tensor must be a 1-element real tensor, got shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        if value.device.type == "meta":
            raise ValueError(f"{name} must not be a meta tensor (it has no value)")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def check_hyper(
    group: dict[str, Any], name: str, *, below_one: bool = False, at_most_one: bool = False
) -> float:
    """Validate ``group[name]`` (:func:`hyper_scalar`; finite, >= 0, and < 1 or <= 1 when
    asked) and return it as a float; a number is stored back as a Python float, a tensor
    stays (as in torch.optim, a scheduler may fill it in place)."""
    value = group[name]
    x = check_nonnegative(name, hyper_scalar(name, value))
    if (below_one and x >= 1.0) or (at_most_one and x > 1.0):
        bound = "<" if below_one else "<="
        raise ValueError(f"{name} must satisfy 0 <= {name} {bound} 1, got {value!r}")
    if not isinstance(value, torch.Tensor):
        group[name] = x
    return x


def _plain(name: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return hyper_scalar(name, value)
    if isinstance(value, tuple | list) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(hyper_scalar(f"{name}[{j}]", v) for j, v in enumerate(value))
    return value


def plain_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``group`` with tensor hyperparameters (``lr``, ``betas``, ...) read as Python
    floats: the values a step uses."""
    return {k: v if k == "params" else _plain(k, v) for k, v in group.items()}


def check_param_dtypes(params: list[torch.Tensor], group_index: int) -> None:
    """Refuse a parameter that is neither floating point nor complex (an integer or bool
    tensor): no step can move it, and torch.optim fails at its first step naming nothing."""
    for i, p in enumerate(params):
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(
                f"param group {group_index}, parameter {i} (shape {tuple(p.shape)}) has dtype "
                f"{p.dtype}; optimizers take floating-point or complex parameters"
            )


def check_sparse(group_index: int, group: dict[str, Any], name: str) -> None:
    """Refuse sparse gradients (RMSProp and Adam, as torch.optim), naming the parameter; run
    by ``_precheck``, so before any param group is stepped."""
    for i, p in enumerate(group["params"]):
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError(
                f"{name} does not support sparse gradients; param group {group_index}, "
                f"parameter {i} (shape {tuple(p.shape)}) has one (use SGD or SparseAdam)"
            )


def check_torch_only_flags(name: str, *, differentiable: bool = False) -> None:
    """Accept torch.optim's ``differentiable`` keyword at its default (``False``), so code
    written for the torch namesake runs unchanged, and refuse ``True`` (autograd through the
    step is not implemented)."""
    if differentiable is not False:
        raise ValueError(
            f"differentiable must be False for sgdlab.{name}, got {differentiable!r}: "
            "autograd through the optimizer step is not implemented"
        )


def _check_like(name: str, value: Any, p: torch.Tensor) -> None:
    """A state tensor must match its parameter: shape, device and dtype (float32 also for a
    bfloat16/float16 parameter, whose fused-path state and master copy are float32)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a tensor like its parameter, got {type(value).__name__}")
    dtypes = (p.dtype, torch.float32) if p.dtype in (torch.float16, torch.bfloat16) else (p.dtype,)
    if value.shape != p.shape or value.dtype not in dtypes or value.device != p.device:
        raise ValueError(
            f"{name} is {tuple(value.shape)} {value.dtype} on {value.device}; its parameter is "
            f"{tuple(p.shape)} {p.dtype} on {p.device}"
        )


class BatchScaledOptimizer(Optimizer):
    """Base class: a torch optimizer whose per-step hyperparameters were tuned at
    ``ref_batch_size`` (B0) and are moved to the current ``batch_size`` (B) by ``scaling``.

    Every param group carries ``batch_size``, ``ref_batch_size`` and ``scaling`` (so they are
    saved in ``state_dict``). When ``B == B0`` (the default: both unset) the group's own
    hyperparameters are used unchanged and the optimizer reproduces its torch.optim namesake.
    LR schedulers act on ``group['lr']``, the value at B0, and the scaling applies on top.
    """

    _momentum_form: str = "ema"
    #: the torch.optim namesake, for messages
    _torch_name: str = ""
    #: the keys of a parameter's state: "param" (a tensor like the parameter), "step" (a
    #: one-element count tensor) or "scalar" (a host number)
    _state_keys: dict[str, str] = {}
    #: keys every non-empty state holds (as in the namesake's state)
    _state_required: tuple[str, ...] = ()
    #: keys every saved param group holds (the namesake's options that torch never defaults)
    _group_required: tuple[str, ...] = ("lr",)
    #: the algorithm's fused step (``fused=True``); ``None`` for an optimizer without one
    _fused_kernel: FusedKernel | None = None

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        batch_size: int | None,
        ref_batch_size: int | None,
        scaling: str | None,
        default_scaling: str,
        foreach: bool | None,
        nonfinite: str | None,
        fused: bool | None = None,
        capturable: bool = False,
    ) -> None:
        # Defaults are filled in here (a batch size is checked first, so that the message
        # names the argument given); the options are checked per param group by
        # _check_group, the same check a loaded state dict goes through.
        for key, value in (("batch_size", batch_size), ("ref_batch_size", ref_batch_size)):
            if value is not None:
                check_batch_size(key, value)
        if batch_size is None:
            batch_size = ref_batch_size
        if ref_batch_size is None:
            ref_batch_size = batch_size
        if scaling is None:
            scaling = default_scaling
        if nonfinite is None:
            nonfinite = "ignore" if capturable else "raise"
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        defaults = dict(defaults)
        defaults.update(
            batch_size=batch_size,
            ref_batch_size=ref_batch_size,
            scaling=scaling,
            foreach=foreach,
            fused=fused,
        )
        if capturable is not False:
            defaults["capturable"] = capturable
        self.nonfinite = nonfinite
        #: the fused path's flat buffers (their one owner; :meth:`_drop_fused` rebuilds)
        self._fused = FusedState(self._fused_kernel)
        #: number of steps skipped because of non-finite gradients (``nonfinite="skip"``)
        self.skipped_steps = 0
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ hooks for subclasses
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a param group's hyperparameters (called for every group, also those added
        later with ``add_param_group``); must only read the group."""
        raise NotImplementedError

    def _hyper_of(self, group: dict[str, Any]) -> _hyper.PerStep:
        raise NotImplementedError

    def _with_hyper(self, group: dict[str, Any], step: _hyper.PerStep) -> dict[str, Any]:
        raise NotImplementedError

    def _update_group(self, group: dict[str, Any], hp: dict[str, Any], foreach: bool) -> None:
        raise NotImplementedError

    def _group_index(self, group: dict[str, Any]) -> int:
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    def _precheck(self, group: dict[str, Any]) -> None:
        """Raise before any parameter changes if ``group`` cannot be stepped (e.g. missing
        per-example statistics); every group is checked before the first one is updated."""

    def _extra_tensors(self, group: dict[str, Any], p: torch.Tensor) -> list[torch.Tensor]:
        """Tensors besides ``p.grad`` that must be finite for a step (second moments)."""
        return []

    # ------------------------------------------------------------------ torch plumbing
    def _drop_fused(self) -> None:
        """Let the fused path rebuild its flat buffers at the next step, after writing the
        device-side counters of capturable groups (Adam's debiasing products and lecture
        counts) back into the state, which the rebuild starts from."""
        fused = self.__dict__.get("_fused")
        if fused is not None:
            fused.drop()
        self._fused = FusedState(self._fused_kernel)

    def _check_group(self, group: dict[str, Any], nonfinite: str | None) -> None:
        """Check (and normalise) every option of a param group: the constructor's arguments,
        a group added by ``add_param_group`` and a loaded group all pass through here.

        ``nonfinite``: the optimizer's policy, checked against ``capturable``; ``None`` for a
        loaded group (a capturable checkpoint may continue in an optimizer that checks the
        gradients on the host: eagerly, not in a CUDA graph)."""
        for key in ("batch_size", "ref_batch_size"):
            if group[key] is not None:
                group[key] = check_batch_size(key, group[key])
        check_choice("scaling", group["scaling"], _hyper.RULES)
        foreach, fused = group["foreach"], group["fused"]
        capturable = group.get("capturable", False)
        check_torch_only_flags(
            type(self).__name__, differentiable=group.get("differentiable", False)
        )
        if capturable not in (True, False):
            raise ValueError(f"capturable must be True or False, got {capturable!r}")
        if foreach not in (None, True, False):
            raise ValueError(f"foreach must be None, True or False, got {foreach!r}")
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        if capturable and nonfinite not in (None, "ignore"):
            raise ValueError(
                f"nonfinite must be 'ignore' with capturable=True, got {nonfinite!r}: a CUDA "
                "graph cannot hold its host check (GradScaler skips non-finite steps instead)"
            )
        if capturable and (fused is False or foreach):
            raise ValueError(
                f"capturable=True runs on the fused path; got fused={fused!r}, "
                f"foreach={foreach!r} (leave both unset)"
            )
        if fused and foreach:
            raise ValueError("fused=True and foreach=True cannot both be set; pass one of them")
        self._validate_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            check_param_dtypes(self.param_groups[-1]["params"], len(self.param_groups) - 1)
            self._check_group(self.param_groups[-1], self.nonfinite)
        except Exception:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise
        self._drop_fused()

    def _check_state(
        self, gi: int, pi: int, p: torch.Tensor, st: dict[str, Any], group: dict[str, Any]
    ) -> None:
        """Check one parameter's loaded state against the keys this class keeps and against
        the parameter (shape, dtype, device); converts a number ``step`` (older torch
        checkpoints) to a tensor, as torch.optim's ``__setstate__`` does."""
        name = f"sgdlab.{type(self).__name__}"
        where = f"state of param group {gi}, parameter {pi}"
        for key in st:
            if key not in self._state_keys:
                known = ", ".join(repr(k) for k in self._state_keys)
                raise ValueError(
                    f"{where} has {key!r}, which {name} does not keep ({known}): "
                    "a state dict of another optimizer?"
                )
        missing = [k for k in self._state_required if k not in st]
        if st and missing:
            raise ValueError(f"{where} lacks {missing[0]!r}: not a state dict of {name}")
        for key, value in st.items():
            kind = self._state_keys[key]
            if kind == "scalar":
                st[key] = check_finite(f"{where}: {key}", value)
            elif kind == "step":
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(
                        check_finite(f"{where}: step", value), dtype=scalar_dtype()
                    )
                if value.numel() != 1 or not bool(torch.isfinite(value)) or value < 0:
                    raise ValueError(f"{where}: step must be one finite count >= 0, got {value!r}")
                st[key] = value
            else:
                _check_like(f"{where}: {key}", value, p)

    def __getstate__(self) -> dict[str, Any]:
        # pickle and deepcopy: the options set at construction travel with the state
        self._fused.sync()
        state = super().__getstate__()
        state.update(nonfinite=self.nonfinite, skipped_steps=self.skipped_steps)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Adopt ``state`` (unpickling, or ``load_state_dict``'s groups and state) after
        checking all of it, so a bad state raises before anything changes.

        A checkpoint of the torch.optim namesake lacks sgdlab's keys, which take this
        optimizer's defaults; a group or state of another optimizer class is refused (torch
        raises a ``KeyError`` for it, at loading or at the first step)."""
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        name = f"sgdlab.{type(self).__name__}"
        for gi, group in enumerate(state["param_groups"]):
            missing = [k for k in self._group_required if k not in group]
            if missing:
                raise ValueError(
                    f"param group {gi} lacks {missing[0]!r}: not a state dict "
                    f"of {name} or torch.optim.{self._torch_name}"
                )
            for key, value in defaults.items():
                if key != "differentiable":  # torch's default, not an option of the group
                    group.setdefault(key, value)
            self._check_group(group, None)
            for pi, p in enumerate(group["params"]):
                if p in state["state"]:
                    self._check_state(gi, pi, p, state["state"][p], group)
        had_differentiable = "differentiable" in defaults
        super().__setstate__(state)
        if not had_differentiable:  # torch adds it; sgdlab's defaults round-trip unchanged
            self.defaults.pop("differentiable", None)
        self._fused = FusedState(self._fused_kernel)  # rebuilt from the new state
        self.__dict__.setdefault("nonfinite", "raise")
        self.__dict__.setdefault("skipped_steps", 0)

    def state_dict(self) -> dict[str, Any]:
        # capturable groups keep their debiasing counters on the device: copy them into the
        # state first (the step counts are views of the device tensor already)
        self._fused.sync()
        state_dict = super().state_dict()
        # as torch.optim's: no entry for a parameter without state (the step may look one up)
        state_dict["state"] = {k: v for k, v in state_dict["state"].items() if v}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of its torch.optim namesake.

        As torch.optim, the saved hyperparameters replace the constructor's (an Adam
        checkpoint with ``amsgrad=True`` gives ``amsgrad=True``). Unlike torch, everything is
        checked before anything changes: each group as the constructor checks its arguments,
        each state entry against the keys this class keeps and against its parameter's shape,
        dtype and device; a state dict of another optimizer class is refused."""
        super().load_state_dict(state_dict)
        # float32 state of low-precision parameters (fused path) stays float32
        restore_float32_state(self, state_dict)

    # ------------------------------------------------------------------ batch size
    def set_batch_size(self, batch_size: int) -> None:
        """Set the batch size ``B`` of the coming steps (all param groups)."""
        b = check_batch_size("batch_size", batch_size)
        for group in self.param_groups:
            group["batch_size"] = b
            if group["ref_batch_size"] is None:
                group["ref_batch_size"] = b

    @property
    def batch_size(self) -> int | None:
        """The current batch size of the first param group."""
        return self.param_groups[0]["batch_size"]

    def effective_hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        """The numbers a step of ``group`` applies now: ``lr`` and the rule's other
        hyperparameters (``betas`` or ``momentum``/``alpha``, ``eps``) moved from
        ``ref_batch_size`` to ``batch_size`` by the group's scaling rule (unchanged when
        equal), its ``weight_decay`` and the ``batch_size``.

        Param groups hold the values at ``ref_batch_size`` (what LR schedulers act on, so a
        schedule composes with any change of batch size); this is where monitors read the
        values applied (``docs/integrations.md``)."""
        hp = self._step_hyperparameters(group)
        keys = [*self._with_hyper(hp, _hyper.PerStep(lr=1.0)), "weight_decay", "batch_size"]
        return {k: hp[k] for k in keys if k in hp}

    def _step_hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        """The whole group as a step uses it: :meth:`effective_hyperparameters`'s values in
        place of the group's, every option beside them."""
        hp = plain_hyperparameters(group)
        b, b0 = hp["batch_size"], hp["ref_batch_size"]
        if b is None or b0 is None or b == b0:
            return hp
        if hp["lr"] == 0.0:
            # lr = 0 is a no-op at any batch size; the betas move as with any lr.
            base = self._hyper_of({**hp, "lr": 1.0})
            scaled = _hyper.rescale(base, b0, b, hp["scaling"], self._momentum_form)
            hp.update(self._with_hyper(hp, scaled))
            hp["lr"] = 0.0
            return hp
        base = self._hyper_of(hp)
        scaled = _hyper.rescale(base, b0, b, hp["scaling"], self._momentum_form)
        hp.update(self._with_hyper(hp, scaled))
        return hp

    def _carry_momentum(self, group: dict[str, Any], new: float) -> None:
        """Carry heavy-ball buffers across a change of the momentum coefficient that a change
        of batch size made.

        A heavy-ball buffer ``b = m b + g`` is ``N mu`` with ``mu`` the running average of the
        gradient and ``N = 1/(1-m)``. When a batch-size change moves ``m_old -> m_new``, the
        average ``mu`` carries over, so ``b`` is multiplied by ``(1 - m_old) / (1 - m_new)``;
        a buffer is dropped when either coefficient is 0 (no average to carry). A change of
        ``group["momentum"]`` itself (a scheduler cycling it, as ``OneCycleLR`` does, or an
        edit) keeps the buffer as it is, as torch.optim does.
        """
        prev = group.get("momentum_in_use")
        asked = hyper_scalar("momentum", group["momentum"])
        if prev is not None and prev != new and group.get("momentum_asked", asked) == asked:
            for p in group["params"]:
                buf = self.state[p].get("momentum_buffer") if p in self.state else None
                if buf is None:
                    continue
                if new == 0.0 or prev == 0.0:
                    del self.state[p]["momentum_buffer"]
                    self._drop_fused()
                else:
                    buf.mul_((1.0 - prev) / (1.0 - new))
        group["momentum_in_use"] = new
        group["momentum_asked"] = asked

    # ------------------------------------------------------------------ step
    def _use_foreach(self, group: dict[str, Any], params: list[torch.Tensor]) -> bool:
        if group["foreach"] is not None:
            return bool(group["foreach"])
        # As torch.optim: the foreach path by default only where it pays (accelerators).
        return bool(params) and all(p.device.type != "cpu" for p in params)

    def _use_fused(self, group: dict[str, Any], params: list[torch.Tensor]) -> bool:
        """The fused path (:mod:`sgdlab.optim._fast`) is opt-in: ``fused=True`` (implied by
        ``capturable=True``); meta parameters (shape dry-runs, no values) take the foreach
        or reference path, which torch.optim steps on the meta device."""
        if not params or any(p.is_meta for p in params):
            return False
        return bool(group.get("fused") or group.get("capturable"))

    def _step_fused(
        self, group: dict[str, Any], hp: dict[str, Any], params: list[torch.Tensor]
    ) -> bool:
        """Step ``group`` on the fused path when it is on and applies (``True``); else change
        nothing, drop the group's flat buffers and return ``False``."""
        return self._fused.update(self, group, hp, params, self._use_fused(group, params))

    def _find_nonfinite(self) -> str | None:
        """Describe the first parameter whose gradient (or extra statistic) is not finite.

        One max-abs reduction per tensor (NaN propagates) and one host sync for the step;
        the description is only formatted when something is found."""
        if any(group.get("fused") for group in self.param_groups):
            if grads_all_finite(self):  # one reduction over each flat gradient buffer
                return None
        tensors: list[torch.Tensor] = []
        where: list[tuple[int, int, torch.Tensor, str]] = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                named = [("grad", p.grad)] + [
                    ("grad_second_moment", t) for t in self._extra_tensors(group, p)
                ]
                for what, t in named:
                    if t.is_sparse:
                        t = t.coalesce().values()
                    if t.numel() == 0 or t.is_meta:  # nothing to check (meta: no values)
                        continue
                    tensors.append(t)
                    where.append((gi, pi, p, what))
        if not tensors:
            return None
        maxima = torch._foreach_norm(tensors, float("inf"))
        device = maxima[0].device
        finite = torch.stack([m.float().to(device) for m in maxima]).isfinite()
        if bool(finite.all()):
            return None
        gi, pi, p, what = where[int((~finite).nonzero()[0, 0])]
        return f"param group {gi}, parameter {pi} (shape {tuple(p.shape)}): {what}"

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        batch_size: int | None = None,
    ) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (as in torch.optim).
            batch_size: the batch size ``B`` of this step; it stays in force for later steps
                (same as :meth:`set_batch_size`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if batch_size is not None:
            self.set_batch_size(batch_size)
        if self.nonfinite != "ignore":
            bad = self._find_nonfinite()
            if bad is not None:
                if self.nonfinite == "raise":
                    raise NonFiniteGradientError(
                        f"non-finite values in {bad}; no parameter or state was changed. "
                        "Pass nonfinite='skip' to skip such steps, or use torch.amp.GradScaler "
                        "for mixed precision."
                    )
                self.skipped_steps += 1
                return loss
        # Everything that can refuse a group (missing statistics, sparse gradients, a batch
        # size its rule cannot reach) runs for every group before the first is updated.
        for group in self.param_groups:
            self._precheck(group)
        todo = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                todo.append((group, params, self._step_hyperparameters(group)))
        for group, params, hp in todo:
            self._update_group(group, hp, self._use_foreach(group, params))
        return loss
