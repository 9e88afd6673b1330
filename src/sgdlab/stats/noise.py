"""Gradient-noise meter: noise scale, per-group variance and SGD temperature.

From one batch of B examples drawn with replacement, with ``ghat = p.grad`` the batch mean of
per-example gradients g_b and ``m = p.grad_second_moment`` the batch mean of g_b * g_b:

    tr Sigma_hat = B/(B-1) * sum_i (m_i - ghat_i^2)        unbiased for tr Sigma
    |G|^2_hat    = |ghat|^2 - tr Sigma_hat / B              unbiased for |G|^2

since E m_i = G_i^2 + Sigma_ii and E ghat_i^2 = G_i^2 + Sigma_ii/B. The simple gradient noise
scale is B_simple = tr Sigma / |G|^2 (McCandlish, Kaplan, Amodei et al. 2018, "An empirical
model of large-batch training", appendix A). The ratio of two unbiased estimates is biased and
noisy, so, as in that paper, numerator and denominator are smoothed separately (exponential
moving averages with Adam's bias correction) before dividing. The SGD temperature of a group
trained at learning rate eta is ``eta tr Sigma / (2B)`` (lecture, 1-D Langevin, erratum 2:
T = eta sigma^2/(2B)).

Example::

    >>> import torch, sgdlab.stats
    >>> model = torch.nn.Linear(3, 1)
    >>> tracker = sgdlab.stats.track(model)
    >>> meter = sgdlab.stats.NoiseMeter(model, batch_size=16, lr=0.1)
    >>> x = torch.randn(16, 3)
    >>> model(x).pow(2).mean().backward()
    >>> reading = meter.update()
    >>> sorted(reading.tr_sigma_groups)
    ['bias', 'weight']

Checkpoints. :meth:`NoiseMeter.state_dict` holds the running state (the two moving averages,
the number of updates that set their bias correction, the step counter, ``beta`` and the group
names); a meter built the same way and given it by :meth:`NoiseMeter.load_state_dict` continues
exactly as the uninterrupted one would (the readings' ``history`` is not part of it)::

    >>> state = meter.state_dict()
    >>> resumed = sgdlab.stats.NoiseMeter(model, batch_size=16, lr=0.1)
    >>> resumed.load_state_dict(state)
    >>> resumed.updates, resumed.step
    (1, 1)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .._validation import check_batch_size, check_positive, check_unit_interval
from ._attribute import ATTRIBUTE

__all__ = ["NoiseMeter", "NoiseReading", "noise_statistics"]

STATE_FORMAT = "sgdlab.NoiseMeter/1"
_STATE_KEYS = ("format", "step", "updates", "ema_tr_sigma", "ema_grad_sq_norm", "beta", "groups")


def noise_statistics(
    grads: Sequence[Tensor],
    second_moments: Sequence[Tensor],
    batch_size: int,
    dim: int | tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor]:
    """Unbiased ``(tr Sigma, |G|^2)`` from batch means of g_b and of g_b * g_b.

    ``grads[k]`` and ``second_moments[k]`` are the batch mean of per-example gradients and of
    their squares for tensor k. Sums run over ``dim`` of every tensor (all dims if None), so
    leading dims can index independent batches. Computed in float64 and entry by entry
    (``m - g^2`` cancels when the noise is small against the gradient; float32 squares, or the
    difference of two sums, would lose it), one tensor at a time in two float64 buffers of the
    largest tensor's size: never a float64 copy of the whole model. Returns float64 tensors.
    """
    B = check_batch_size("batch_size", batch_size)
    if B < 2:
        raise ValueError(
            f"batch_size must be >= 2 to estimate a variance from one batch, got {batch_size!r}"
        )
    if len(grads) != len(second_moments) or not grads:
        raise ValueError(
            f"grads and second_moments must be non-empty and of equal length, got "
            f"{len(grads)} and {len(second_moments)}"
        )
    return _unbiased(*_sums(grads, second_moments, dim, _scratch(grads)), B)


def _unbiased(t: Any, s: Any, B: int) -> tuple[Any, Any]:
    """``(tr Sigma, |G|^2)`` from ``t = sum (m - g^2)`` and ``s = sum g^2`` of a batch of B:
    ``tr Sigma = B/(B-1) t`` and ``|G|^2 = s - tr Sigma / B`` (tensors or floats)."""
    tr = t * (B / (B - 1))
    return tr, s - tr / B


def _scratch(tensors: Iterable[Tensor]) -> dict[torch.device, tuple[Tensor, Tensor]]:
    """Two float64 buffers per device, of the largest tensor's size there."""
    sizes: dict[torch.device, int] = {}
    for t in tensors:
        sizes[t.device] = max(sizes.get(t.device, 1), t.numel())
    return {
        dev: (
            torch.empty(n, dtype=torch.float64, device=dev),
            torch.empty(n, dtype=torch.float64, device=dev),
        )
        for dev, n in sizes.items()
    }


def _sums(
    grads: Sequence[Tensor],
    second_moments: Sequence[Tensor],
    dim: int | tuple[int, ...] | None,
    scratch: dict[torch.device, tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """``(sum (m - g^2), sum g^2)`` over the tensors, in float64, through ``scratch``."""
    tr = None
    sq = None
    for g, m in zip(grads, second_moments, strict=True):
        if g.shape != m.shape:
            raise ValueError(
                f"grad of shape {tuple(g.shape)} does not match second moment of shape "
                f"{tuple(m.shape)}"
            )
        if g.layout != torch.strided:  # a sparse gradient (nn.Embedding(sparse=True))
            g = g.to_dense()
        bg, bd = scratch[g.device]
        n = g.numel()
        g64 = bg[:n].view(g.shape).copy_(g)
        diff = bd[:n].view(m.shape).copy_(m).addcmul_(g64, g64, value=-1)  # m - g^2
        if dim is None:
            t, s = diff.sum(), torch.dot(g64.reshape(-1), g64.reshape(-1))
        else:
            t, s = diff.sum(dim), (g64 * g64).sum(dim)
        tr = t if tr is None else tr + t
        sq = s if sq is None else sq + s
    assert tr is not None and sq is not None  # at least one tensor
    return tr, sq


class ScalarWriter(Protocol):
    """What :class:`NoiseMeter` writes to: ``torch.utils.tensorboard.SummaryWriter`` fits."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any: ...


@dataclass
class NoiseReading:
    """One step's noise statistics (``*_smoothed``: bias-corrected moving averages)."""

    step: int
    batch_size: int
    tr_sigma: float
    grad_sq_norm: float
    b_simple: float
    tr_sigma_smoothed: float
    grad_sq_norm_smoothed: float
    b_simple_smoothed: float
    temperature: float | None
    tr_sigma_groups: dict[str, float] = field(default_factory=dict)
    grad_sq_norm_groups: dict[str, float] = field(default_factory=dict)
    temperature_groups: dict[str, float] = field(default_factory=dict)


def _params_of(name: str, value: Any) -> list[Tensor]:
    """The tensors of an iterable of parameters (a single tensor would be read as its rows)."""
    if (
        isinstance(value, Tensor)
        or isinstance(value, str | bytes)
        or not isinstance(value, Iterable)
    ):
        raise TypeError(f"{name} must be an iterable of parameters, got {type(value).__name__}")
    params = list(value)
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"{name} must hold tensors (parameters), got {type(p).__name__}")
    return params


def _meter_batch(name: str, value: Any) -> int:
    """A fixed batch size: an integer >= 2 (one example has no variance)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"{name} must be an integer >= 2 or a Tracker (has num_examples), got {value!r}"
        )
    b = check_batch_size(name, int(value))
    if b < 2:
        raise ValueError(f"{name} must be >= 2 to estimate a variance, got {b}")
    return b


def _tracker_batch(tracker: Any) -> int | None:
    """N of the mean of the tracker's last backward pass: ``tracker.batch_size`` if set, else
    the examples it saw (None: it saw none)."""
    n = int(tracker.num_examples)
    if n == 0:
        return None
    fixed = getattr(tracker, "batch_size", None)
    if (
        fixed is None
        and getattr(tracker, "passes", 1) > 1
        and getattr(tracker, "reduction", "mean") == "mean"
    ):
        raise ValueError(
            f"the tracker accumulated {tracker.passes} backward passes (micro-batches) "
            "without tracker.batch_size, so p.grad sums micro-batch means: set "
            "tracker.batch_size to the examples of all micro-batches"
        )
    return n if fixed is None else int(fixed)


def _groups(source: Any) -> tuple[dict[str, list[nn.Parameter]], list[dict] | None]:
    if isinstance(source, nn.Module):
        named = [(n, p) for n, p in source.named_parameters() if p.requires_grad]
        return {n: [p] for n, p in named}, None
    if isinstance(source, torch.optim.Optimizer):
        names = [str(g.get("name", f"group{i}")) for i, g in enumerate(source.param_groups)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"the optimizer's param groups have the same name {twice} (a group's default "
                "name is group<i>); the meter reports per group: give each group its own "
                "'name'"
            )
        groups = {n: list(g["params"]) for n, g in zip(names, source.param_groups, strict=True)}
        return groups, source.param_groups
    if isinstance(source, Mapping):
        groups = {str(k): _params_of(f"groups[{k!r}]", v) for k, v in source.items()}
        return groups, None
    if isinstance(source, Iterable) and not isinstance(source, str | bytes | Tensor):
        return {"all": _params_of("groups", source)}, None
    raise TypeError(
        "groups must be a Module, an Optimizer, a mapping name -> parameters or an iterable of "
        f"parameters, got {type(source).__name__}"
    )


class NoiseMeter:
    """Per-step and smoothed gradient-noise statistics; call after each backward pass.

    Args:
        groups: a model (one group per named parameter), an optimizer (its parameter groups,
            learning rates read at every update), a mapping ``name -> parameters``, or an
            iterable of parameters (one group).
        batch_size: B, the number of examples ``p.grad`` and ``p.grad_second_moment`` average
            over, used when nothing below gives it; or an object with ``num_examples`` (a
            :class:`~sgdlab.stats.Tracker`) to read it from. See "Batch size" below.
        lr: learning rate for the temperature (default: the lr each group of the optimizer
            applies, after an sgdlab optimizer's batch-size rule; without either the
            temperature is ``None``).
        beta: smoothing factor of the moving averages, ``0 <= beta < 1``.
        writer: optional object with ``add_scalar`` (a TensorBoard ``SummaryWriter``).
        prefix: tag prefix for the writer.

    Batch size. Every :meth:`update` takes B, in this order, from

    1. the tracker's last backward pass: ``tracker.batch_size`` if set (the N of its mean),
       else the examples it saw (:attr:`Tracker.num_examples`); the tracker given as
       ``batch_size``, else the one that tracks the meter's parameters;
    2. the optimizer's current batch size (an sgdlab optimizer: ``set_batch_size`` or
       ``step(batch_size=)``; read before the step, so set it before ``update``);
    3. the fixed ``batch_size``.

    :attr:`batch_size` reads the B the next update would use; assigning it sets the fixed
    number, and is refused while a tracker or the optimizer's batch size takes precedence.
    """

    def __init__(
        self,
        groups: Any,
        *,
        batch_size: int | Any | None = None,
        lr: float | None = None,
        beta: float = 0.99,
        writer: ScalarWriter | None = None,
        prefix: str = "noise/",
    ) -> None:
        self.groups, self._param_groups = _groups(groups)
        # an sgdlab optimizer knows the lr its steps apply (its batch-size rule on top of
        # group["lr"]): the temperature uses that one
        applied = getattr(groups, "effective_hyperparameters", None)
        self._applied: Any = applied if callable(applied) else None
        if not self.groups or not all(self.groups.values()):
            raise ValueError("groups must contain at least one parameter per group")
        #: an object with num_examples given as batch_size (a Tracker, a DataParallel)
        self._source: Any = None
        self._fixed: int | None = None
        if (
            batch_size is not None
            and not isinstance(batch_size, numbers.Integral)
            and hasattr(batch_size, "num_examples")
        ):
            self._source = batch_size
        elif batch_size is not None:
            self._fixed = _meter_batch("batch_size", batch_size)
        self.lr = None if lr is None else check_positive("lr", lr)
        self.beta = check_unit_interval("beta", beta)
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must have an add_scalar method, got {type(writer).__name__}")
        self.writer = writer
        self.prefix = prefix
        self.step = 0
        #: number of updates folded into the moving averages (their bias correction)
        self.updates = 0
        self._ema_tr = 0.0
        self._ema_sq = 0.0
        self.history: list[NoiseReading] = []

    # ------------------------------------------------------------------ batch size
    @property
    def batch_size(self) -> int | None:
        """The B the next :meth:`update` divides by (None if nothing gives one yet)."""
        b, _ = self._resolve()
        return b

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        b = _meter_batch("meter.batch_size", value)
        source = self._precedence()
        if source is not None:
            raise AttributeError(
                f"meter.batch_size = {value!r} would be ignored: the meter follows {source}"
            )
        self._fixed = b

    def _precedence(self) -> str | None:
        """What takes precedence over the fixed batch size, in words (None: nothing)."""
        if self._source is not None:
            return f"the {type(self._source).__name__} given as batch_size"
        if self._trackers():
            return "the tracker of its parameters (it counts each backward pass's examples)"
        if self._optimizer_batch() is not None:
            return "the optimizer's batch size; change it with optimizer.set_batch_size"
        return None

    def _trackers(self) -> list[Any]:
        """The trackers attached to the meter's parameters (each once)."""
        from ._attach import tracker_of

        found: dict[int, Any] = {}
        for params in self.groups.values():
            for p in params:
                t = tracker_of(p)
                if t is not None:
                    found.setdefault(id(t), t)
        return list(found.values())

    def _optimizer_batch(self) -> int | None:
        """The optimizer's current batch size (None: not an sgdlab optimizer, or unset)."""
        if self._param_groups is None:
            return None
        sizes = sorted(
            {g["batch_size"] for g in self._param_groups if g.get("batch_size") is not None}
        )
        if len(sizes) > 1:
            raise ValueError(
                f"the optimizer's param groups have the batch sizes {sizes}; the "
                "meter needs one B for all (optimizer.set_batch_size sets all)"
            )
        return sizes[0] if sizes else None

    def _resolve(self) -> tuple[int | None, str]:
        """``(B, where from)``: a tracker's last pass, else the optimizer, else the fixed B."""
        trackers = [self._source] if self._source is not None else self._trackers()
        seen = {}
        for t in trackers:
            b = _tracker_batch(t)
            if b is not None:
                seen[b] = type(t).__name__
        if len(seen) > 1:
            raise ValueError(
                f"the trackers of the meter's parameters saw different batch "
                f"sizes {sorted(seen)} in their last backward pass"
            )
        if seen:
            ((b, name),) = seen.items()
            return b, name
        b = self._optimizer_batch()
        if b is not None:
            return b, "the optimizer"
        return self._fixed, "batch_size"

    def _batch_size(self) -> int:
        b, source = self._resolve()
        if b is None:
            raise ValueError(
                "the meter has no batch size: give batch_size=B, track the model "
                "(sgdlab.stats.track) or use an sgdlab optimizer with a batch size"
            )
        if b < 2:
            raise ValueError(
                f"batch_size must be >= 2 to estimate a variance, got {b} (from {source})"
            )
        return b

    def _group_lr(self, i: int) -> float | None:
        if self.lr is not None:
            return self.lr
        if self._param_groups is None:
            return None
        group = self._param_groups[i]
        if self._applied is not None:
            return float(self._applied(group)["lr"])
        return float(group["lr"])

    @torch.no_grad()
    def update(self, step: int | None = None) -> NoiseReading:
        """Read the statistics of the last backward pass; returns and records a reading."""
        if step is not None and (
            isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0
        ):
            raise ValueError(f"step must be an integer >= 0 (or None), got {step!r}")
        B = self._batch_size()
        tr_g: dict[str, float] = {}
        sq_g: dict[str, float] = {}
        temp_g: dict[str, float] = {}
        per_group = []
        for name, params in self.groups.items():
            grads, moments = [], []
            for p in params:
                if p.grad is None:  # no gradient this step (frozen, unused): as torch.optim
                    continue
                m = getattr(p, ATTRIBUTE, None)
                if m is None:
                    raise ValueError(
                        f"a parameter of group {name!r} has a gradient but no "
                        "grad_second_moment; attach sgdlab.stats.track(model) before the "
                        "backward pass (a tracker tracks the parameters that require grad when "
                        "it is attached)"
                    )
                grads.append(p.grad.detach())
                moments.append(m.detach())
            per_group.append((grads, moments))
        if not any(grads for grads, _ in per_group):
            raise ValueError(
                "no parameter of the meter's groups has a gradient: call update() "
                "after the backward pass"
            )
        # float64 work one tensor at a time in shared buffers, one read from the device
        scratch = _scratch(g for grads, _ in per_group for g in grads)
        first = next(g[0].device for g, _ in per_group if g)
        # a group without gradients this step (all frozen or unused) contributes zero
        sums = [
            torch.stack(_sums(g, m, None, scratch))
            if g
            else torch.zeros(2, dtype=torch.float64, device=first)
            for g, m in per_group
        ]
        values = torch.stack([t.to(first) for t in sums]).tolist()
        for i, (name, (t, s)) in enumerate(zip(self.groups, values, strict=True)):
            tr_g[name], sq_g[name] = _unbiased(t, s, B)
            lr = self._group_lr(i)
            if lr is not None:
                temp_g[name] = lr * tr_g[name] / (2 * B)
        tr_total, sq_total = sum(tr_g.values()), sum(sq_g.values())
        if math.isfinite(tr_total) and math.isfinite(sq_total):
            self._ema_tr = self.beta * self._ema_tr + (1 - self.beta) * tr_total
            self._ema_sq = self.beta * self._ema_sq + (1 - self.beta) * sq_total
            self.updates += 1
        # else a step with inf/NaN gradients (a loss scaler's overflow, which the optimizer
        # skips): reported as it is, kept out of the moving averages
        self.step = self.step + 1 if step is None else int(step) + 1
        debias = 1 - self.beta**self.updates
        tr_s = self._ema_tr / debias if self.updates else math.nan
        sq_s = self._ema_sq / debias if self.updates else math.nan
        reading = NoiseReading(
            step=self.step - 1,
            batch_size=B,
            tr_sigma=tr_total,
            grad_sq_norm=sq_total,
            b_simple=tr_total / sq_total if sq_total != 0 else math.inf,
            tr_sigma_smoothed=tr_s,
            grad_sq_norm_smoothed=sq_s,
            b_simple_smoothed=tr_s / sq_s if sq_s != 0 else math.inf,
            temperature=sum(temp_g.values()) if temp_g else None,
            tr_sigma_groups=tr_g,
            grad_sq_norm_groups=sq_g,
            temperature_groups=temp_g,
        )
        self.history.append(reading)
        if self.writer is not None:
            self._write(reading)
        return reading

    __call__ = update

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The running state: moving averages of ``tr Sigma`` and ``|G|^2``, the update count
        of their bias correction, the step counter, ``beta`` and the group names (plain
        Python numbers and strings; ``history`` is not included)."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "updates": self.updates,
            "ema_tr_sigma": self._ema_tr,
            "ema_grad_sq_norm": self._ema_sq,
            "beta": self.beta,
            "groups": list(self.groups),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the meter must have the same ``beta`` and group names.

        Raises:
            TypeError: ``state`` is not a mapping, or a value has the wrong type.
            ValueError: a key is missing, a count is negative, an average is NaN, or
                ``beta`` / the groups differ from this meter's.
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state must be a mapping (NoiseMeter.state_dict()), got {type(state).__name__}"
            )
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(
                f"state is missing {', '.join(missing)}; expected the keys of "
                f"NoiseMeter.state_dict(): {', '.join(_STATE_KEYS)}"
            )
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"state format must be {STATE_FORMAT!r}, got {state['format']!r}")
        counts = {}
        for key in ("step", "updates"):
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"state[{key!r}] must be an int, got {type(v).__name__}")
            if v < 0:
                raise ValueError(f"state[{key!r}] must be >= 0, got {v}")
            counts[key] = v
        emas = {}
        for key in ("ema_tr_sigma", "ema_grad_sq_norm", "beta"):
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise TypeError(f"state[{key!r}] must be a float, got {type(v).__name__}")
            if not math.isfinite(v):
                raise ValueError(f"state[{key!r}] must be finite, got {v!r}")
            emas[key] = float(v)
        if emas["beta"] != self.beta:
            raise ValueError(
                f"state was recorded with beta={emas['beta']!r}, this meter has "
                f"beta={self.beta!r}; build the meter with the same beta"
            )
        groups = state["groups"]
        if not isinstance(groups, list | tuple) or not all(isinstance(g, str) for g in groups):
            raise TypeError(f"state['groups'] must be a list of group names, got {groups!r}")
        if list(groups) != list(self.groups):
            raise ValueError(
                f"state holds the groups {list(groups)}, this meter has {list(self.groups)}"
            )
        self.step, self.updates = counts["step"], counts["updates"]
        self._ema_tr, self._ema_sq = emas["ema_tr_sigma"], emas["ema_grad_sq_norm"]

    def _write(self, r: NoiseReading) -> None:
        w, pre, s = self.writer, self.prefix, r.step
        assert w is not None
        for tag in ("tr_sigma", "grad_sq_norm", "b_simple", "b_simple_smoothed"):
            w.add_scalar(pre + tag, float(getattr(r, tag)), s)
        if r.temperature is not None:
            w.add_scalar(pre + "temperature", r.temperature, s)
        for name, v in r.tr_sigma_groups.items():
            w.add_scalar(f"{pre}tr_sigma/{name}", v, s)
