r"""Data-parallel training on torch.distributed with global per-example statistics.

:class:`DataParallel` wraps a model in ``torch.nn.parallel.DistributedDataParallel`` (DDP) and
drives one optimizer step on ``W`` ranks with ``k`` micro-batches each so that it equals a
single-process step on the ``B`` concatenated examples:

* **Batch size.** :meth:`DataParallel.begin_step` all-gathers every rank's example count
  (:func:`sgdlab.distributed.gather_batch`), giving ``B = sum_r n_r`` (``per-rank batch x W x
  k`` for equal micro-batches), and sets ``optimizer.set_batch_size(B)`` so the batch-size
  scaling rules of :mod:`sgdlab.hyper` see the global batch. Ranks with different ``k``, or a
  rank whose micro-batches do not add up to the ``local_size`` it declared, raise the same
  ``ValueError`` on every rank before any gradient is exchanged (:meth:`DataParallel.accumulate`).
* **Gradients.** The loss is assumed to be the *mean* over the examples of the micro-batch.
  :meth:`DataParallel.backward` multiplies it by ``W n / B`` (``n`` the micro-batch size), so
  after DDP's uniform average over ranks and the accumulation over micro-batches
  ``p.grad = (1/B) sum_b g_b`` exactly, also for unequal local or micro-batch sizes.
* **Per-example second moments.** The augmented backward (:func:`sgdlab.stats.track`) runs with
  ``tracker.batch_size = B``; rank r then holds ``W^2/B sum_{b on r} g_b^2`` and one flattened
  ``all_reduce(SUM)`` scaled by ``1/W^2`` (:class:`~sgdlab.distributed.SecondMomentReducer`)
  leaves ``p.grad_second_moment = (1/B) sum_b g_b^2`` over all ranks' examples: what
  ``RMSProp``/``Adam`` with ``second_moment="per_example"`` and the noise meter read.
* **Noise meter.** With ``noise_meter=True`` a :class:`sgdlab.stats.NoiseMeter` reads the global
  ``p.grad`` and ``p.grad_second_moment`` with batch size ``B``, so ``tr Sigma``, ``|G|^2`` and
  ``B_simple`` (McCandlish et al. 2018) are those of the global batch, equal on every rank.
* **Accumulation.** ``k`` micro-batches per step; with ``no_sync=True`` (default) DDP's
  gradient all-reduce runs only in the last micro-batch's backward (``DDP.no_sync``), otherwise
  in every one. Both give the same gradient (the average is linear).

**Overlap.** The second moments of a backward pass are complete when the tracker signals the
end of the pass (:meth:`~sgdlab.stats.Tracker.on_pass_end`), from the autograd callback its
first hook queued, before DDP's own end-of-backward callback, which waits for the gradient
buckets. The reducer's all-reduce is launched asynchronously from that signal, so it is in
flight while DDP finishes its gradient all-reduce, and is waited for in
:meth:`DataParallel.synchronize` (called by ``step``). It cannot start earlier: a parameter's
second moment is only final once every module that uses it has seen its output gradient. A
pass that signals nothing has its all-reduce launched right after ``loss.backward()`` returns
(correct, without overlap).

Without an initialised process group the same code runs as a single process (no DDP, no
communication), which is also how a checkpoint written by ``W`` ranks resumes on one.

Ranks stay identical: DDP broadcasts rank 0's parameters at construction, every reduced
quantity is the same tensor on every rank, and the optimizer update is deterministic.

Example (each rank of ``torchrun --nproc_per_node=2 train.py``)::

    import torch, sgdlab
    from sgdlab.distributed import DataParallel, init_from_env

    init_from_env()                                  # NCCL on GPUs, gloo on CPUs
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = sgdlab.RMSProp(model.parameters(), lr=1e-3, second_moment="per_example",
                         ref_batch_size=32, scaling="linear")
    dp = DataParallel(model, opt, accumulation_steps=2, noise_meter=True)
    for x, y in loader:                              # this rank's share of the step
        dp.begin_step(len(x))                        # global B; opt.set_batch_size(B)
        for xb, yb in zip(x.chunk(2), y.chunk(2)):
            with dp.accumulate(len(xb)):
                dp.backward(torch.nn.functional.mse_loss(dp(xb), yb))
        reading = dp.step()                          # global noise reading, then opt.step()
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .._validation import check_batch_size, check_count
from ..stats import NoiseMeter, NoiseReading, PassSummary, Tracker, track
from ._group import is_distributed, rank_and_size
from .batch import GlobalBatch, check_examples, gather_batch
from .checkpoint import load_checkpoint, save_checkpoint
from .moments import SecondMomentReducer

__all__ = ["DataParallel"]


def _wants_second_moments(optimizer: torch.optim.Optimizer) -> bool:
    return any(g.get("second_moment") == "per_example" for g in optimizer.param_groups)


class DataParallel:
    """One optimizer step over the global batch of all ranks (see the module docstring).

    Args:
        model: the model (moved to its device beforehand; same architecture on every rank).
        optimizer: an optimizer over ``model``'s parameters; an sgdlab optimizer gets
            ``set_batch_size(B)`` with the global batch at every step.
        accumulation_steps: micro-batches ``k`` per step (equal on every rank).
        no_sync: skip DDP's gradient all-reduce in all but the last micro-batch.
        second_moments: compute global ``p.grad_second_moment``; default: when the optimizer
            has a ``second_moment="per_example"`` group, a ``tracker`` is given or the noise
            meter is on.
        tracker: an existing :class:`sgdlab.stats.Tracker` on ``model`` (mean reduction, no
            per-example norms); default: one is attached when second moments are needed.
        noise_meter: ``True`` or a dict of :class:`sgdlab.stats.NoiseMeter` keyword arguments
            (``beta``, ``lr``, ``writer``, ``prefix``): read global noise statistics in
            :meth:`step`, over the optimizer's parameter groups.
        equal_local: require equal local batch sizes on every rank.
        overlap: launch the second-moment all-reduce inside the last backward pass, before
            DDP waits for its gradient buckets (default); ``False`` launches it after
            ``loss.backward()`` returns (for comparison; same result).
        process_group: process group (default group).
        **ddp_kwargs: passed to ``DistributedDataParallel`` (``device_ids`` defaults to the
            model's CUDA device).

    Raises:
        TypeError: ``model`` is not a Module, ``optimizer`` not an Optimizer.
        ValueError: bad ``accumulation_steps``, a tracker on another model, with a sum
            reduction or with per-example norms (those stay per rank).
    """

    def __init__(  # noqa: C901
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        accumulation_steps: int = 1,
        no_sync: bool = True,
        second_moments: bool | None = None,
        tracker: Tracker | None = None,
        noise_meter: bool | dict[str, Any] = False,
        equal_local: bool = False,
        overlap: bool = True,
        process_group: Any = None,
        **ddp_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, DistributedDataParallel):
            raise TypeError(
                "model must be the plain module: DataParallel wraps it in "
                "DistributedDataParallel itself"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not isinstance(noise_meter, bool | dict):
            raise TypeError(
                f"noise_meter must be a bool or a dict of NoiseMeter arguments, got "
                f"{type(noise_meter).__name__}"
            )
        self.accumulation_steps = check_count("accumulation_steps", accumulation_steps)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no trainable parameters")
        distributed = is_distributed(process_group)
        if ddp_kwargs and not distributed:
            raise ValueError(
                "DistributedDataParallel options were given "
                f"({', '.join(sorted(ddp_kwargs))}) but torch.distributed is not "
                "initialised; call sgdlab.distributed.init_from_env() (under torchrun) or "
                "torch.distributed.init_process_group first"
            )
        if second_moments is None:
            second_moments = (
                tracker is not None or bool(noise_meter) or _wants_second_moments(optimizer)
            )
        if not second_moments:
            if tracker is not None:
                raise ValueError("second_moments=False contradicts the tracker that was given")
            if _wants_second_moments(optimizer):
                raise ValueError(
                    "second_moments=False, but the optimizer reads per-example second moments "
                    "(second_moment='per_example')"
                )
            if noise_meter:
                raise ValueError("noise_meter needs second moments; pass second_moments=True")
        if tracker is not None:
            self._check_tracker(tracker, model)
        #: the global batch of the current (or last) step
        self.batch: GlobalBatch | None = None
        self.meter: NoiseMeter | None = None
        if noise_meter:  # validates the meter's arguments
            kwargs = dict(noise_meter) if isinstance(noise_meter, dict) else {}
            self.meter = NoiseMeter(optimizer, batch_size=self, **kwargs)
        # All checks are done: nothing below raises for a bad configuration, so no rank enters
        # DDP's construction (a collective) when another would not.
        self.no_sync = bool(no_sync)
        self.equal_local = bool(equal_local)
        self.overlap = bool(overlap)
        self.group = process_group
        self.module = model
        self.optimizer = optimizer
        self.rank, self.world_size = rank_and_size(process_group)
        self._own_tracker = False
        if second_moments and tracker is None:
            # Attached before DDP and before this object's hooks (see _on_grad).
            tracker = track(model)
            self._own_tracker = True
        self.tracker: Tracker | None = tracker
        self.ddp: DistributedDataParallel | None = None
        if distributed:
            device = next(model.parameters()).device
            if device.type == "cuda":
                ddp_kwargs.setdefault("device_ids", [device.index])
            self.ddp = DistributedDataParallel(model, process_group=process_group, **ddp_kwargs)
        self.reducer = (
            SecondMomentReducer(tracker.parameters, group=process_group)
            if tracker is not None
            else None
        )
        #: optimizer steps taken (restored from checkpoints)
        self.steps = 0
        #: steps whose second-moment all-reduce started inside the backward pass, before DDP's
        #: end-of-backward wait (the overlapped path)
        self.overlapped_launches = 0
        self._open = False
        self._micro = 0
        self._seen = 0
        self._in_micro = False
        self._micro_n = 0
        self._did_backward = False
        self._armed = False
        self._synced = False
        self._handles: list[Any] = []
        if tracker is not None and self.overlap:
            # The tracker signals the end of a pass after writing its statistics, from the
            # callback its first hook queued on the autograd engine: before DDP's, which is
            # queued when the last bucket is ready.
            self._handles.append(tracker.on_pass_end(self._on_pass_end))

    @staticmethod
    def _check_tracker(tracker: Tracker, model: nn.Module) -> None:
        if not isinstance(tracker, Tracker):
            raise TypeError(f"tracker must be a sgdlab.stats.Tracker, got {type(tracker).__name__}")
        ids = {id(p) for p in model.parameters()}
        if any(id(p) not in ids for p in tracker.parameters):
            raise ValueError("tracker must be attached to the model given to DataParallel")
        if tracker.reduction != "mean":
            raise ValueError(
                f"tracker must use reduction='mean' (DataParallel's losses are means over the "
                f"micro-batch), got reduction={tracker.reduction!r}"
            )
        if tracker.per_example_norms:
            raise ValueError(
                "trackers with per_example_norms=True are not supported: per-example norms "
                "stay on the rank that computed them; use the global second moments"
            )

    # ------------------------------------------------------------------ forward
    @property
    def wrapped(self) -> nn.Module:
        """The module to call: the DDP wrapper, or the model without torch.distributed."""
        return self.ddp if self.ddp is not None else self.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(*args, **kwargs)

    @property
    def num_examples(self) -> int:
        """The global batch ``B`` of the current step (what a NoiseMeter divides by); 0
        before the first step."""
        return 0 if self.batch is None else self.batch.size

    # ------------------------------------------------------------------ one step
    def begin_step(self, local_size: int) -> GlobalBatch:
        """Start a step in which this rank processes ``local_size`` examples (over all its
        micro-batches). A collective: every rank calls it. Clears the gradients and second
        moments, all-gathers the batch sizes, sets the optimizer's batch size to the global
        ``B`` and returns the :class:`GlobalBatch`."""
        if self._open:
            raise RuntimeError(
                "begin_step called twice without step(); finish the step with dp.step()"
            )
        if self.reducer is not None and self.reducer.pending:
            self.reducer.wait()  # left by an abandoned step: a collective must complete
        batch = gather_batch(
            local_size, self.accumulation_steps, group=self.group, equal_local=self.equal_local
        )
        self.optimizer.zero_grad(set_to_none=True)
        if self.tracker is not None:
            self.tracker.zero()
            self.tracker.batch_size = batch.size
        set_batch = getattr(self.optimizer, "set_batch_size", None)
        if callable(set_batch):
            set_batch(batch.size)
        self.batch = batch
        self._open = True
        self._micro = 0
        self._seen = 0
        self._synced = False
        return batch

    @contextlib.contextmanager
    def accumulate(self, micro_batch_size: int) -> Iterator[None]:
        """Context for the forward and backward pass of one micro-batch of
        ``micro_batch_size`` examples; DDP's gradient all-reduce is skipped (``no_sync``) in
        all but the last micro-batch of the step.

        Before a micro-batch whose backward pass exchanges gradients (the last; every one
        without ``no_sync``) the ranks all-gather their example counts: when a rank's
        micro-batches do not add up to its ``begin_step(local_size)`` every rank raises the same
        ``ValueError`` here, before the exchange, and the step is abandoned. (Without
        ``no_sync`` a shortfall shows only at the last micro-batch, after the earlier ones
        exchanged; nothing is applied.)"""
        if not self._open:
            raise RuntimeError("accumulate outside a step; call begin_step(local_size) first")
        if self._in_micro:
            raise RuntimeError("accumulate blocks cannot be nested")
        n = check_batch_size("micro_batch_size", micro_batch_size)
        k = self.accumulation_steps
        if self._micro >= k:
            raise ValueError(
                f"more micro-batches than accumulation_steps={k} in one step; call step() "
                "after the last one"
            )
        last = self._micro == k - 1
        if last or (self.ddp is not None and not self.no_sync):
            # this micro-batch's backward exchanges gradients: every rank checks its count first
            assert self.batch is not None
            try:
                check_examples(
                    self._seen + n, self.batch.local_size, k - 1 - self._micro, group=self.group
                )
            except ValueError:
                self._open = False  # the step is abandoned; begin_step starts a new one
                raise
        self._in_micro, self._micro_n, self._did_backward = True, n, False
        self._armed = last and self.reducer is not None
        skip = self.ddp is not None and self.no_sync and not last
        try:
            with self.ddp.no_sync() if skip else contextlib.nullcontext():  # type: ignore[union-attr]
                yield
        except BaseException:
            self._open = False  # the step is abandoned; begin_step starts a new one
            raise
        finally:
            self._in_micro = False
            self._armed = False
        if not self._did_backward:
            raise RuntimeError("an accumulate block must call dp.backward(loss) once")
        self._micro += 1
        self._seen += n

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """Backward pass of the micro-batch's mean loss, scaled by ``W n / B`` (see the module
        docstring). Keyword arguments go to ``Tensor.backward``."""
        if not self._in_micro:
            raise RuntimeError("dp.backward(loss) must be called inside `with dp.accumulate(n):`")
        if self._did_backward:
            raise RuntimeError("dp.backward was already called in this accumulate block")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "loss must be a one-element tensor (the mean loss of the micro-batch), got "
                + (
                    f"shape {tuple(loss.shape)}"
                    if isinstance(loss, Tensor)
                    else type(loss).__name__
                )
            )
        assert self.batch is not None
        scale = self.batch.loss_scale(self._micro_n)
        (loss * scale if scale != 1.0 else loss).backward(**kwargs)
        self._did_backward = True
        if self._armed and self.reducer is not None and not self.reducer.pending:
            self._launch()

    def _on_pass_end(self, summary: PassSummary) -> None:
        # the last micro-batch's statistics are complete: start their all-reduce now
        if self._armed and self.reducer is not None and not self.reducer.pending:
            self._launch()
            self.overlapped_launches += 1

    def _launch(self) -> None:
        assert self.reducer is not None
        self.reducer.launch(1.0 / self.world_size**2)

    def synchronize(self) -> None:
        """Wait for the step's communication; afterwards ``p.grad`` and
        ``p.grad_second_moment`` hold the global batch means. Called by :meth:`step`."""
        if not self._open:
            raise RuntimeError("synchronize outside a step; call begin_step(local_size) first")
        if self._synced:
            return
        k = self.accumulation_steps
        if self._micro != k:
            raise RuntimeError(
                f"the step has {self._micro} of accumulation_steps={k} micro-batches; run the "
                "remaining ones before step()"
            )
        assert self.batch is not None
        if self._seen != self.batch.local_size:  # accumulate checked it on every rank
            self._open = False
            raise ValueError(
                f"the micro-batches of this step hold {self._seen} examples, but begin_step "
                f"declared local_size={self.batch.local_size}"
            )
        if self.reducer is not None:
            if not self.reducer.pending:
                self._launch()
            self.reducer.wait()
        self._synced = True

    def step(self) -> NoiseReading | None:
        """Finish the step: wait for the communication, read the noise meter (if any), take
        the optimizer step. Returns the meter's reading, else None."""
        self.synchronize()
        try:
            reading = self.meter.update(self.steps) if self.meter is not None else None
            self.optimizer.step()
        finally:
            self._open = False
        self.steps += 1
        return reading

    def train_step(
        self,
        inputs: Tensor,
        targets: Tensor,
        loss_fn: Callable[[Any, Tensor], Tensor],
    ) -> tuple[float, NoiseReading | None]:
        """One whole step on this rank's ``inputs``/``targets``: split along dim 0 into
        ``accumulation_steps`` micro-batches (sizes differ by at most one), run them and
        :meth:`step`. ``loss_fn(output, targets)`` returns the mean loss of a micro-batch.
        Returns this rank's mean loss over its examples and the noise reading (or None)."""
        n = int(inputs.shape[0])
        if int(targets.shape[0]) != n:
            raise ValueError(
                f"inputs and targets must have the same first dimension, got {n} and "
                f"{int(targets.shape[0])}"
            )
        self.begin_step(n)
        total = 0.0
        for xb, yb in zip(
            torch.tensor_split(inputs, self.accumulation_steps),
            torch.tensor_split(targets, self.accumulation_steps),
        ):
            m = int(xb.shape[0])
            with self.accumulate(m):
                loss = loss_fn(self(xb), yb)
                self.backward(loss)
            total += float(loss.detach()) * m
        return total / n, self.step()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state plus the step bookkeeping (independent of world size)."""
        return {
            "format": "sgdlab.distributed/1",
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "steps": self.steps,
            "batch_size": None if self.batch is None else self.batch.size,
            "world_size": self.world_size,
            "accumulation_steps": self.accumulation_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (written on any world size)."""
        if not isinstance(state, dict) or state.get("format") != "sgdlab.distributed/1":
            raise ValueError(
                "state is not a sgdlab.distributed checkpoint (missing format "
                "'sgdlab.distributed/1')"
            )
        if self._open:
            raise RuntimeError("cannot load a checkpoint in the middle of a step")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the checkpoint once (rank 0, atomically); every rank waits until it exists.
        The noise meter's smoothed state goes with it when there is a meter."""
        return save_checkpoint(self.state_dict, path, group=self.group, noise_meter=self.meter)

    def load(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Load a checkpoint written by :meth:`save` (any world size) on every rank; returns
        the stored dictionary (``steps``, ``batch_size``, ``world_size`` ...). A stored noise
        meter state is restored into this object's meter, when it has one."""
        device = next(self.module.parameters()).device
        state = load_checkpoint(path, map_location=device)
        self.load_state_dict(state)
        if self.meter is not None and "noise_meter" in state:
            self.meter.load_state_dict(state["noise_meter"])
        return state

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Remove the hooks (and the tracker DataParallel attached itself)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._own_tracker and self.tracker is not None:
            self.tracker.detach()

    def __enter__(self) -> DataParallel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
