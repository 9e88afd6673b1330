"""The Lightning callback: batch sizes, second moments against brute force, logged keys and
learning rates against the update itself, checkpoints, lifetime."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")

from integ_common import per_example_grads, scalars  # noqa: E402

import sgdlab  # noqa: E402
import sgdlab.stats  # noqa: E402
from sgdlab.integrations.lightning import SGDLabCallback  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
N_EXAMPLES, BATCH, ACCUM = 10, 4, 2  # batches 4, 4, 2; windows of 8 and 2 examples


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_EXAMPLES, 3, generator=g, dtype=dtype)
    y = torch.randn(N_EXAMPLES, 1, generator=g, dtype=dtype)
    return torch.utils.data.TensorDataset(x, y)


class Regression(pl.LightningModule):
    """A small MLP on a mean squared error; keeps what each optimizer step saw."""

    def __init__(self, make_opt, sched=None):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
        ).double()
        self.make_opt, self.sched = make_opt, sched
        self.steps, self.window = [], []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.window.append(batch)
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = self.make_opt(self.parameters())
        if self.sched is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.sched(opt), "interval": "step"},
        }

    def on_before_optimizer_step(self, optimizer):  # after the callback's
        ps = dict(self.net.named_parameters())
        self.steps.append(
            {
                "batch_size": optimizer.batch_size,
                "window": list(self.window),
                "grad": {n: p.grad.clone() for n, p in ps.items()},
                "moment": {n: getattr(p, "grad_second_moment", None) for n, p in ps.items()},
                "before": {n: p.detach().clone() for n, p in ps.items()},
            }
        )
        self.window = []

    def on_train_batch_end(self, outputs, batch, batch_idx):  # after the window's step
        if self.steps and "after" not in self.steps[-1]:
            self.steps[-1]["after"] = {
                n: p.detach().clone() for n, p in self.net.named_parameters()
            }


def adam(params):
    return sgdlab.Adam(params, lr=1e-2, second_moment="per_example", batch_size=8)


def trainer(tmp_path, callback, logger=False, **kw):
    kw.setdefault("max_epochs", 2)
    return pl.Trainer(
        callbacks=[callback],
        logger=logger,
        accumulate_grad_batches=ACCUM,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def loader():
    return torch.utils.data.DataLoader(data(), batch_size=BATCH, shuffle=False)


def test_batch_sizes_and_second_moments_against_brute_force(tmp_path):
    model = Regression(adam)
    trainer(tmp_path, SGDLabCallback(log_every_n_steps=1)).fit(model, loader())
    # 2 epochs of windows [4, 4] and [2]: the partial one is its true size
    assert [s["batch_size"] for s in model.steps] == [8, 2, 8, 2]

    def loss_of(ex):
        x, y = ex
        return torch.nn.functional.mse_loss(model.net(x[None]), y[None])

    for step in model.steps[:2]:  # parameters restored to the step's own
        with torch.no_grad():
            for n, p in model.net.named_parameters():
                p.copy_(step["before"][n])
        sizes = [len(x) for x, _ in step["window"]]
        examples = [(x[i], y[i]) for x, y in step["window"] for i in range(len(x))]
        g = per_example_grads(model.net, loss_of, examples)
        # Lightning's loss: micro-batch mean / accumulate_grad_batches -> example b's share
        share = torch.cat([torch.full((b,), 1.0 / (ACCUM * b), dtype=torch.float64) for b in sizes])
        N = sum(sizes)
        for n, gb in g.items():
            e = gb * share.view(-1, *[1] * (gb.dim() - 1))
            torch.testing.assert_close(step["grad"][n], e.sum(0), rtol=1e-12, atol=1e-14)
            # the second moment of the examples whose mean is the gradient: N sum_b e_b^2
            torch.testing.assert_close(
                step["moment"][n], N * (e * e).sum(0), rtol=1e-10, atol=1e-14
            )


def test_logged_keys_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    model = Regression(adam)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, SGDLabCallback(log_every_n_steps=2), logger=logger).fit(model, loader())
    found = scalars(tmp_path / "tb")
    keys = [
        "sgdlab/batch_size",
        "sgdlab/b_simple",
        "sgdlab/b_simple_smoothed",
        "sgdlab/tr_sigma",
        "sgdlab/grad_sq_norm",
    ]
    keys += [
        f"sgdlab/{k}/group0"
        for k in ("tr_sigma", "grad_sq_norm", "temperature", "lr", "beta1", "beta2", "eps")
    ]
    for key in keys:
        assert key in found, sorted(found)
        assert [s for s, _ in found[key]] == [0, 2], key  # steps 0 and 2 of 4
        assert all(math.isfinite(v) for _, v in found[key]), key
    assert [v for _, v in found["sgdlab/batch_size"]] == [8, 8]


@pytest.mark.parametrize("with_scheduler", [False, True])
def test_logged_lr_is_the_applied_lr(tmp_path, with_scheduler):
    """SGD without momentum: delta p = -lr grad, with the lr after the linear batch-size rule
    (ref batch 4) and a scheduler; the logged lr (CSV, full precision) is that lr."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    def sgd(params):
        return sgdlab.SGD(params, lr=0.1, batch_size=4, scaling="linear")

    sched = (lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5)) if with_scheduler else None
    model = Regression(sgd, sched)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, SGDLabCallback(log_every_n_steps=1), logger=logger).fit(model, loader())
    with open(logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("sgdlab/lr/group0")]
    assert len(rows) == len(model.steps) == 4
    for i, (row, step) in enumerate(zip(rows, model.steps)):
        lr = float(row["sgdlab/lr/group0"])
        expected = 0.1 * (0.5**i if with_scheduler else 1) * step["batch_size"] / 4
        assert lr == pytest.approx(expected, rel=1e-15)
        w = "0.weight"
        delta = step["after"][w] - step["before"][w]
        torch.testing.assert_close(delta, -lr * step["grad"][w], rtol=1e-12, atol=1e-15)


def test_checkpoint_resume_continues_the_same_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = Regression(adam)
    trainer(tmp_path / "a", SGDLabCallback(), max_epochs=2).fit(full, loader())

    first = Regression(adam)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    t = pl.Trainer(
        callbacks=[SGDLabCallback(), ckpt],
        logger=False,
        accumulate_grad_batches=ACCUM,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    t.fit(first, loader())
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    groups = saved["optimizer_states"][0]["param_groups"]
    assert groups[0]["batch_size"] == 2 and groups[0]["ref_batch_size"] == 8
    resumed, callback = Regression(adam), SGDLabCallback()
    trainer(tmp_path / "b", callback, max_epochs=2).fit(
        resumed, loader(), ckpt_path=tmp_path / "ck" / "last.ckpt"
    )
    assert callback.driver.steps == 4 and callback.meter.updates == 4
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sa, sb = full.steps[-1], resumed.steps[-1]
    assert sa["batch_size"] == sb["batch_size"] == 2


def test_detached_on_exception_and_at_end(tmp_path):
    class Failing(Regression):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model, callback = Failing(adam), SGDLabCallback()
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, callback).fit(model, loader())
    assert callback.tracker is None
    sgdlab.stats.track(model).detach()  # refused if the callback's tracker were still on
    model = Regression(adam)
    trainer(tmp_path, callback).fit(model, loader())
    assert callback.tracker is None
    assert all(not hasattr(p, "grad_second_moment") for p in model.parameters())


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="log_every_n_steps must be an integer >= 1, got 0"):
        SGDLabCallback(log_every_n_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        SGDLabCallback(max_grad_norm=-1.0)
    model = Regression(adam)
    with pytest.raises(ValueError, match="gradient_clip_val=1.0 clips"):
        trainer(tmp_path, SGDLabCallback(), gradient_clip_val=1.0).fit(model, loader())
    assert all(not hasattr(p, "grad_second_moment") for p in model.parameters())
    torch_opt = Regression(lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(TypeError, match="needs an sgdlab optimizer"):
        trainer(tmp_path, SGDLabCallback()).fit(torch_opt, loader())


def test_imports_stay_light_and_name_the_extra():
    code = (
        "import sys, sgdlab, sgdlab.stats, sgdlab.integrations\n"
        "assert 'lightning' not in sys.modules and 'transformers' not in sys.modules\n"
        "sys.modules['lightning'] = None\n"
        "try:\n    import sgdlab.integrations.lightning\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "pip install 'sgdlab[integrations]'" in out and "lightning" in out


def test_ddp_global_batch_and_second_moments(tmp_path):
    """Lightning's DDP strategy on 2 CPU ranks: each step's batch size is the global one (the
    partial last batch included), and grad_second_moment on every rank is the second moment
    of the global batch whose mean DDP's averaged gradient is (brute force over both ranks'
    examples)."""
    job = Path(__file__).with_name("lightning_ddp_job.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, str(job), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [s["batch_size"] for s in ranks[0]] == [8, 8, 4]
    assert [s["batch_size"] for s in ranks[1]] == [8, 8, 4]
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    net = net.double()

    def loss_of(ex):
        x, y = ex
        return torch.nn.functional.mse_loss(net(x[None]), y[None])

    for s0, s1 in zip(*ranks):
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(s0["before"][n])
        examples = [(x[i], y[i]) for x, y in (s0["batch"], s1["batch"]) for i in range(len(x))]
        g = per_example_grads(net, loss_of, examples)
        for n, gb in g.items():
            # DDP: the mean over ranks of the local means (equal local batches: the mean)
            torch.testing.assert_close(s0["grad"][n], gb.mean(0), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(s0["moment"][n], (gb * gb).mean(0), rtol=1e-10, atol=1e-14)
            assert torch.equal(s0["moment"][n], s1["moment"][n])
