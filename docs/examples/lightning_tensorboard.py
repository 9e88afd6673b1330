"""Lightning with sgdlab: a per-example Adam, gradient accumulation, a partial last batch and
the noise meter in TensorBoard (docs/integrations.md). Run: python lightning_tensorboard.py DIR"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import sgdlab
from sgdlab.integrations.lightning import SGDLabCallback


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)  # the batch mean
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        opt = sgdlab.Adam(
            self.parameters(), lr=1e-3, second_moment="per_example", batch_size=64
        )  # lr, betas given for 64 examples a step
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(out: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    loader = torch.utils.data.DataLoader(data, batch_size=32)  # 32 x 6 + 8
    trainer = pl.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,  # steps of 64, 64, 64, 8
        logger=TensorBoardLogger(out, name="lightning"),
        callbacks=[SGDLabCallback(log_every_n_steps=1)],
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(Regression(), loader)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs")
