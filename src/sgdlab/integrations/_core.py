"""What both callbacks do at each optimizer step, without a framework.

A framework backpropagates, per micro-batch j of an accumulation window, a loss
``c_j sum_{b in j} l_b``: Lightning ``(1/(k B_j)) sum l_b`` (k = accumulate_grad_batches),
the Hugging Face Trainer ``(1/(k' B_j)) sum l_b`` or, for models that take
``num_items_in_batch``, the sum over the window's tokens divided by their count. Its gradient
is ``G = sum_b e_b`` with ``e_b`` example b's share. Over the window's ``N`` examples (those
of every rank under DDP) the per-example gradients the framework's ``G`` is the mean of are
``g_b = N e_b``, and the matching second moment is

    m = (1/N) sum_b g_b * g_b = N sum_b e_b * e_b.

The tracker with a fixed ``batch_size = N0`` leaves ``N0 sum_b e_b * e_b`` on each parameter
whatever ``c_j`` is, so the step multiplies it by ``N / N0`` once the window's ``N`` is known
(:meth:`StepDriver.before_step`); ``N0`` is the previous step's count, so a step of the usual
size pays nothing. With equal micro-batches this is the statistic of the concatenated batch
(docs/stats.md, "Gradient accumulation"); under DDP, which averages ``G`` over ranks, the
ranks' ``m`` are averaged too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sgdlab.stats import NoiseMeter, NoiseReading, clip_grad_norm_, track
from sgdlab.stats.tracker import ATTRIBUTE

__all__ = ["StepDriver", "unwrap_optimizer", "missing_extra"]

# the keys of effective_hyperparameters a step's log reads (nothing else of the dict)
_HYPER_KEYS = ("lr", "momentum", "alpha", "eps")


def missing_extra(framework: str, error: ImportError) -> ImportError:
    """The ImportError raised when ``framework`` is not installed, naming the pip extra."""
    return ImportError(
        f"sgdlab.integrations needs {framework}, which is not installed ({error}): "
        "pip install 'sgdlab[integrations]'"
    )


def _is_sgdlab(optimizer: Any) -> bool:
    return isinstance(optimizer, torch.optim.Optimizer) and all(
        callable(getattr(optimizer, a, None))
        for a in ("set_batch_size", "effective_hyperparameters")
    )


def unwrap_optimizer(optimizer: Any) -> Any:
    """The sgdlab optimizer inside a framework's wrapper (Lightning's ``LightningOptimizer``,
    accelerate's ``AcceleratedOptimizer``: both keep it as ``.optimizer``)."""
    for _ in range(8):
        if _is_sgdlab(optimizer) or not hasattr(optimizer, "optimizer"):
            break
        optimizer = optimizer.optimizer
    if not _is_sgdlab(optimizer):
        raise TypeError(
            "SGDLabCallback needs an sgdlab optimizer (sgdlab.SGD, RMSProp or Adam), got "
            f"{type(optimizer).__name__}"
        )
    return optimizer


def check_log_every(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"log_every_n_steps must be an integer >= 1, got {value!r}")
    return value


def check_max_norm(value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value > 0
        or not math.isfinite(value)
    ):
        raise ValueError(f"max_grad_norm must be a finite number > 0 (or None), got {value!r}")
    return float(value)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device() -> torch.device:
    """Where a small tensor for a collective lives: the current CUDA device under NCCL."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class StepDriver:
    """Tracker, noise meter and batch size of one training run (see the module docstring).

    Args:
        log_every_n_steps: return the log's values every this many optimizer steps.
        beta: smoothing of the noise meter's moving averages.
        prefix: start of every logged key.
        max_grad_norm: clip the gradient and its second moment together
            (:func:`sgdlab.stats.clip_grad_norm_`) after the meter's reading, before the step.
    """

    def __init__(
        self, *, log_every_n_steps: int, beta: float, prefix: str, max_grad_norm: float | None
    ) -> None:
        self.log_every_n_steps = check_log_every(log_every_n_steps)
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 1:
            raise ValueError(f"beta must be a number with 0 <= beta < 1, got {beta!r}")
        self.beta = float(beta)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.prefix = prefix
        self.max_grad_norm = check_max_norm(max_grad_norm)
        self.tracker: Any = None
        self.meter: NoiseMeter | None = None
        self.optimizer: Any = None
        self.steps = 0  # optimizer steps driven (restored from checkpoints)
        self.num_examples = 0  # examples of the current step, all ranks (the meter reads it)
        self.last: NoiseReading | None = None
        self._meter_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifetime
    def start(self, model: nn.Module, optimizer: Any) -> None:
        """Attach the tracker to ``model`` and build the meter over ``optimizer``."""
        opt = unwrap_optimizer(optimizer)
        names = [str(g.get("name", f"group{i}")) for i, g in enumerate(opt.param_groups)]
        if len(set(names)) != len(names):
            raise ValueError(f"the optimizer's param groups need distinct names, got {names}")
        meter = NoiseMeter(opt, batch_size=self, beta=self.beta)  # refuses before attaching
        if self._meter_state is not None:
            meter.load_state_dict(self._meter_state)
        self.end()
        self.tracker = track(model, batch_size=1)
        self.optimizer, self.meter, self._meter_state = opt, meter, None

    def end(self) -> None:
        """Detach the tracker (also after an exception); the meter keeps its state."""
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.detach()

    # ------------------------------------------------------------------ each step
    def before_step(self) -> dict[str, float] | None:
        """Before the optimizer's step: second moments of the window, ``set_batch_size``,
        the meter's reading, clipping; the values to log on a log step, else None."""
        tracker, opt, meter = self.tracker, self.optimizer, self.meter
        if tracker is None or opt is None or meter is None:
            raise RuntimeError("SGDLabCallback: the training run has not started (no tracker)")
        n_local = tracker.num_examples
        n0 = tracker.batch_size
        if n_local and n_local != n0:
            for p in tracker.parameters:
                m = getattr(p, ATTRIBUTE, None)
                if m is not None:
                    m.mul_(n_local / n0)
        world = _world()
        total = n_local
        if world > 1:
            from sgdlab.distributed.moments import SecondMomentReducer

            count = torch.tensor([n_local], dtype=torch.int64, device=_comm_device())
            dist.all_reduce(count)
            total = int(count.item())
            reducer = SecondMomentReducer(tracker.parameters)
            reducer.launch(scale=1.0 / world)
            reducer.wait()
        if n_local:
            tracker.batch_size = n_local  # the next step's N0
        if total < 1:  # no tracked backward pass this step: nothing to measure or scale
            return None
        self.num_examples = total
        opt.set_batch_size(total)
        reading = meter.update(self.steps) if total >= 2 else None
        if self.max_grad_norm is not None:
            clip_grad_norm_(tracker.parameters, self.max_grad_norm)
        self.last = reading
        step, self.steps = self.steps, self.steps + 1
        if step % self.log_every_n_steps:
            return None
        return self.values(reading)

    def values(self, reading: NoiseReading | None) -> dict[str, float]:
        """The logged values: batch size, applied hyperparameters per group, the reading."""
        opt = self.optimizer
        assert opt is not None
        pre = self.prefix
        out = {f"{pre}batch_size": float(self.num_examples)}
        lrs = {}
        for i, group in enumerate(opt.param_groups):
            name = str(group.get("name", f"group{i}"))
            hp = opt.effective_hyperparameters(group)
            for key in _HYPER_KEYS:
                if key in hp:
                    out[f"{pre}{key}/{name}"] = float(hp[key])
            if "betas" in hp:
                b1, b2 = hp["betas"]
                out[f"{pre}beta1/{name}"], out[f"{pre}beta2/{name}"] = float(b1), float(b2)
            lrs[name] = float(hp["lr"])
        if reading is None:
            return out
        out[f"{pre}b_simple"] = reading.b_simple
        out[f"{pre}b_simple_smoothed"] = reading.b_simple_smoothed
        out[f"{pre}tr_sigma"] = reading.tr_sigma
        out[f"{pre}grad_sq_norm"] = reading.grad_sq_norm
        B = reading.batch_size
        for name, tr in reading.tr_sigma_groups.items():
            out[f"{pre}tr_sigma/{name}"] = tr
            out[f"{pre}grad_sq_norm/{name}"] = reading.grad_sq_norm_groups[name]
            # T = lr tr(Sigma) / (2B) with the lr the step applies (the meter's own reads the
            # group's lr, before the batch-size rule)
            out[f"{pre}temperature/{name}"] = lrs[name] * tr / (2 * B)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Step count and the meter's moving averages (plain Python values)."""
        meter = self.meter.state_dict() if self.meter is not None else self._meter_state
        return {"steps": self.steps, "meter": meter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        steps = state.get("steps") if isinstance(state, dict) else None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(
                f"state['steps'] must be an int >= 0 (SGDLabCallback.state_dict()), got {steps!r}"
            )
        self.steps = steps
        if self.meter is not None and state.get("meter") is not None:
            self.meter.load_state_dict(state["meter"])
        else:
            self._meter_state = state.get("meter")
