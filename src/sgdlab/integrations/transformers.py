"""Hugging Face ``Trainer``: :class:`SGDLabCallback` drives an sgdlab optimizer and logs its
noise.

Give the Trainer an sgdlab optimizer, ``Trainer(optimizers=(opt, scheduler))`` or
``Trainer(optimizer_cls_and_kwargs=(sgdlab.Adam, {...}))``, with ``max_grad_norm=0`` (the
Trainer's clipping cannot reach ``grad_second_moment``; clip with the callback's
``max_grad_norm``), then attach the callback to the trainer::

    trainer = transformers.Trainer(model, args, train_dataset=..., optimizers=(opt, None))
    SGDLabCallback(log_every_n_steps=10).attach(trainer)
    trainer.train()

At train begin it attaches :func:`sgdlab.stats.track` to the model and a
:class:`~sgdlab.stats.NoiseMeter` to the optimizer; before each optimizer step it tells the
optimizer the examples the step averages over (the window's micro-batches, all ranks, a partial
last batch as it is), makes ``grad_second_moment`` the second moment matching the Trainer's
accumulated loss (:mod:`sgdlab.integrations._core`: both its ``1/steps`` and its
``num_items_in_batch`` normalisations), reads the meter and, every ``log_every_n_steps`` steps,
logs through ``trainer.log`` (so to every ``report_to`` integration; TensorBoard prefixes the
keys with ``train/``). The Trainer's own ``learning_rate`` becomes the lr the step applies
(its scheduler holds the lr at the reference batch size). The tracker is detached at train
end and on an exception in ``trainer.train``. The optimizer's state, sgdlab's keys included,
goes through the Trainer's checkpoints (``resume_from_checkpoint``); the meter's moving
averages restart on resume.
"""

from __future__ import annotations

import functools
from typing import Any

from ._core import StepDriver, missing_extra

try:
    import transformers
except ImportError as error:  # pragma: no cover - depends on the environment
    raise missing_extra("transformers", error) from error

__all__ = ["SGDLabCallback"]


class SGDLabCallback(transformers.TrainerCallback):
    """Tracker, noise meter and batch-size rules of sgdlab in a Hugging Face ``Trainer``.

    Args:
        log_every_n_steps: log every this many optimizer steps (the first step included).
        beta: smoothing factor of the meter's moving averages, ``0 <= beta < 1``.
        prefix: start of every logged key.
        max_grad_norm: clip the gradient and ``grad_second_moment`` together before each step
            (in place of ``TrainingArguments.max_grad_norm``, refused with a per-example
            optimizer).
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        *,
        beta: float = 0.99,
        prefix: str = "sgdlab/",
        max_grad_norm: float | None = None,
    ) -> None:
        self.driver = StepDriver(
            log_every_n_steps=log_every_n_steps,
            beta=beta,
            prefix=prefix,
            max_grad_norm=max_grad_norm,
        )
        self._trainer: Any = None

    @property
    def tracker(self) -> Any:
        """The running :class:`~sgdlab.stats.Tracker` (None outside ``train``)."""
        return self.driver.tracker

    @property
    def meter(self) -> Any:
        """The :class:`~sgdlab.stats.NoiseMeter` of the run."""
        return self.driver.meter

    def attach(self, trainer: transformers.Trainer) -> SGDLabCallback:
        """Add the callback to ``trainer`` (once), log through ``trainer.log`` and detach the
        tracker when ``trainer.train`` raises; returns the callback."""
        if not isinstance(trainer, transformers.Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        if self._trainer is not None and self._trainer is not trainer:
            raise ValueError("this SGDLabCallback is attached to another Trainer already")
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        # first: its on_log puts the applied lr into the logs the reporting callbacks write
        callbacks.insert(0, self)
        if self._trainer is None:
            train = trainer.train

            @functools.wraps(train)
            def train_and_detach(*args: Any, **kwargs: Any) -> Any:
                try:
                    return train(*args, **kwargs)
                finally:
                    self.driver.end()

            trainer.train = train_and_detach
        self._trainer = trainer
        return self

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if self._trainer is None:
            raise ValueError(
                "SGDLabCallback logs through the Trainer: add it with "
                "SGDLabCallback(...).attach(trainer), not callbacks=[...]"
            )
        from ._core import unwrap_optimizer

        opt = unwrap_optimizer(optimizer)
        if args.max_grad_norm and any(
            g.get("second_moment") == "per_example" for g in opt.param_groups
        ):
            raise ValueError(
                f"max_grad_norm={args.max_grad_norm} clips p.grad but not grad_second_moment "
                "(the per-example step would be off): set max_grad_norm=0 and use "
                "SGDLabCallback(max_grad_norm=...)"
            )
        self.driver.start(model, opt)
        self.driver.steps = int(state.global_step)  # a resumed run goes on counting

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        values = self.driver.before_step()
        if values:
            self._trainer.log(values)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        """The Trainer logs ``learning_rate`` as its scheduler's lr, ``group["lr"]``: the lr at
        the reference batch size. Replace it by the lr the next step applies (after the
        batch-size rule), in the logs every ``report_to`` integration writes and in
        ``state.log_history``."""
        opt = self.driver.optimizer
        if not logs or "learning_rate" not in logs or opt is None:
            return
        lr = float(opt.effective_hyperparameters(opt.param_groups[0])["lr"])
        logs["learning_rate"] = lr
        if state.log_history and state.log_history[-1].get("learning_rate") is not None:
            state.log_history[-1]["learning_rate"] = lr

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.end()
