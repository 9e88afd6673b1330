"""A Lightning DDP run on 2 CPU ranks (gloo) with SGDLabCallback; each rank saves what its
optimizer steps saw to OUT/rank<r>.pt. Run as a script: Lightning's "ddp" strategy starts
the second rank by running this file again. Used by test_lightning.py."""

from __future__ import annotations

import sys
import warnings

import lightning.pytorch as pl
import torch

import sgdlab
from sgdlab.integrations.lightning import SGDLabCallback

warnings.filterwarnings("ignore")
N_EXAMPLES, BATCH = 20, 4  # 10 examples a rank: batches 4, 4, 2; global steps 8, 8, 4


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
        ).double()
        self.steps: list[dict] = []
        self.batch = None

    def training_step(self, batch, batch_idx):
        self.batch = batch
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return sgdlab.Adam(self.parameters(), lr=1e-2, second_moment="per_example", batch_size=8)

    def on_before_optimizer_step(self, optimizer):  # after the callback's
        ps = dict(self.net.named_parameters())
        self.steps.append(
            {
                "batch_size": optimizer.batch_size,
                "batch": [t.clone() for t in self.batch],
                "grad": {n: p.grad.clone() for n, p in ps.items()},
                "moment": {n: p.grad_second_moment.clone() for n, p in ps.items()},
                "before": {n: p.detach().clone() for n, p in ps.items()},
            }
        )


def main(out: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_EXAMPLES, 3, generator=g, dtype=torch.float64)
    y = torch.randn(N_EXAMPLES, 1, generator=g, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False
    )
    model = Regression()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        callbacks=[SGDLabCallback(log_every_n_steps=1)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, loader)
    torch.save(model.steps, f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
