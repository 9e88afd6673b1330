"""PyTorch Lightning: :class:`SGDLabCallback` drives an sgdlab optimizer and logs its noise.

Add it to the ``Trainer`` and return an sgdlab optimizer from ``configure_optimizers`` (alone,
or with a torch LR scheduler)::

    trainer = lightning.pytorch.Trainer(callbacks=[SGDLabCallback(log_every_n_steps=10)],
                                        accumulate_grad_batches=2, logger=TensorBoardLogger(...))

At fit start it attaches :func:`sgdlab.stats.track` to the LightningModule and a
:class:`~sgdlab.stats.NoiseMeter` to the optimizer; before each optimizer step it tells the
optimizer the number of examples the step averages over (the window's micro-batches, all DDP
ranks, a partial last batch as it is), makes ``grad_second_moment`` the second moment matching
Lightning's accumulated gradient (:mod:`sgdlab.integrations._core`), reads the meter and, every
``log_every_n_steps`` steps, logs to ``trainer.loggers`` (keys in docs/integrations.md). The
tracker is detached at fit end and on an exception. The meter's moving averages and the step
count are saved in Lightning checkpoints (``ckpt_path=`` resumes them).
"""

from __future__ import annotations

from typing import Any

from ._core import StepDriver, missing_extra

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise missing_extra("lightning", error) from error

__all__ = ["SGDLabCallback"]


class SGDLabCallback(pl.Callback):
    """Tracker, noise meter and batch-size rules of sgdlab in a Lightning ``Trainer``.

    Args:
        log_every_n_steps: log every this many optimizer steps (the first step included).
        beta: smoothing factor of the meter's moving averages, ``0 <= beta < 1``.
        prefix: start of every logged key.
        max_grad_norm: clip the gradient and ``grad_second_moment`` together before each step
            (use it instead of the Trainer's ``gradient_clip_val``, which cannot reach the
            second moment and is refused with a per-example optimizer).
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        *,
        beta: float = 0.99,
        prefix: str = "sgdlab/",
        max_grad_norm: float | None = None,
    ) -> None:
        super().__init__()
        self.driver = StepDriver(
            log_every_n_steps=log_every_n_steps,
            beta=beta,
            prefix=prefix,
            max_grad_norm=max_grad_norm,
        )

    @property
    def tracker(self) -> Any:
        """The running :class:`~sgdlab.stats.Tracker` (None outside ``fit``)."""
        return self.driver.tracker

    @property
    def meter(self) -> Any:
        """The :class:`~sgdlab.stats.NoiseMeter` of the run (its ``history`` holds every
        reading)."""
        return self.driver.meter

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"SGDLabCallback drives one optimizer, configure_optimizers gave "
                f"{len(trainer.optimizers)}"
            )
        opt = trainer.optimizers[0]
        clip = trainer.gradient_clip_val
        if clip and any(g.get("second_moment") == "per_example" for g in opt.param_groups):
            raise ValueError(
                f"gradient_clip_val={clip} clips p.grad but not grad_second_moment (the "
                "per-example step would be off): use SGDLabCallback(max_grad_norm=...) instead"
            )
        self.driver.start(pl_module, opt)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        values = self.driver.before_step()
        if values:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.driver.end()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.driver.end()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.driver.end()

    def state_dict(self) -> dict[str, Any]:
        return self.driver.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.driver.load_state_dict(state_dict)
