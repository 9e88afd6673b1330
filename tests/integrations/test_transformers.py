"""The Hugging Face Trainer callback on a tiny GPT-2: batch sizes, second moments against
brute force, logged keys and learning rates against the update itself, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")

from integ_common import per_example_grads, scalars  # noqa: E402

import sgdlab  # noqa: E402
from sgdlab.integrations.transformers import SGDLabCallback  # noqa: E402

N_EXAMPLES, BATCH, ACCUM, T, VOCAB = 10, 4, 2, 6, 17


class Recording(transformers.GPT2LMHeadModel):
    """GPT-2 that keeps the training inputs of each call (the window of a step)."""

    seen: list

    def forward(self, input_ids=None, **kwargs):
        if self.training:
            self.seen.append((input_ids.clone(), kwargs["labels"].clone()))
        return super().forward(input_ids=input_ids, **kwargs)


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=T,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = Recording(cfg).double()
    model.seen = []
    return model


def dataset():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (N_EXAMPLES, T), generator=g)
    pos = torch.arange(T)  # batched positions: per-example gradients of wpe (docs/stats.md)
    return [{"input_ids": i, "labels": i, "position_ids": pos} for i in ids]


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        num_train_epochs=2,
        max_grad_norm=0.0,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        seed=3,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        lr_scheduler_type="constant",
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


class Steps(transformers.TrainerCallback):
    """What each optimizer step saw (added after SGDLabCallback: its changes are visible)."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        ps = dict(self.model.named_parameters())
        self.steps.append(
            {
                "batch_size": optimizer.optimizer.batch_size,
                "window": list(self.model.seen),
                "grad": {n: p.grad.clone() for n, p in ps.items()},
                "moment": {n: getattr(p, "grad_second_moment", None) for n, p in ps.items()},
                "before": {n: p.detach().clone() for n, p in ps.items()},
            }
        )
        self.model.seen.clear()

    def on_optimizer_step(self, args, state, control, **kw):
        self.steps[-1]["after"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}


def run(tmp_path, make_opt, log_every=1, resume=None, **kw):
    model = gpt2()
    opt, sched = make_opt(model)
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, **kw), train_dataset=dataset(), optimizers=(opt, sched)
    )
    callback = SGDLabCallback(log_every_n_steps=log_every).attach(trainer)
    steps = Steps(model)
    trainer.add_callback(steps)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, callback, steps.steps


def adam(model):
    return sgdlab.Adam(model.parameters(), lr=1e-3, second_moment="per_example", batch_size=8), None


def test_batch_sizes_and_second_moments_against_brute_force(tmp_path):
    model, trainer, callback, steps = run(tmp_path, adam)
    assert [s["batch_size"] for s in steps] == [8, 2, 8, 2]
    assert callback.tracker is None
    step = steps[0]
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(step["before"][n])
    ids = torch.cat([i for i, _ in step["window"]])
    tokens = ids.numel()  # the window's labels: the Trainer's num_items_in_batch
    pos = torch.arange(T)[None]

    def loss_of(i):  # example i's share of the Trainer's loss: its tokens' sum / all tokens
        return transformers.GPT2LMHeadModel.forward(
            model,
            input_ids=ids[i : i + 1],
            labels=ids[i : i + 1],
            position_ids=pos,
            num_items_in_batch=tokens,
        ).loss

    model.train()
    e = per_example_grads(model, loss_of, range(len(ids)))
    N = len(ids)
    for n in (
        "transformer.h.0.attn.c_attn.weight",
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
    ):
        # (the loss works in float32: GPT-2's loss upcasts the logits)
        torch.testing.assert_close(step["grad"][n], e[n].sum(0), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(step["moment"][n], N * (e[n] ** 2).sum(0), rtol=1e-6, atol=1e-12)


def test_logged_keys_tensorboard(tmp_path):
    run(tmp_path, adam, log_every=2, report_to="tensorboard")
    found = scalars(tmp_path)
    keys = ["batch_size", "b_simple", "b_simple_smoothed", "tr_sigma", "grad_sq_norm"]
    keys += [
        f"{k}/{g}"
        for k in ("tr_sigma", "grad_sq_norm", "temperature", "lr", "beta1", "beta2", "eps")
        for g in ("group0",)
    ]
    for key in keys:
        tag = "train/sgdlab/" + key
        assert tag in found, sorted(found)
        assert [s for s, _ in found[tag]] == [0, 2], tag
        assert all(math.isfinite(v) for _, v in found[tag]), tag


def test_logged_lr_is_the_applied_lr(tmp_path):
    """Trainer(optimizers=(SGD, scheduler)), no momentum: delta p = -lr grad with the lr after
    the linear rule and the schedule; the logged lr (log_history, full precision) is it."""

    def sgd(model):
        opt = sgdlab.SGD(model.parameters(), lr=0.1, batch_size=4, scaling="linear")
        return opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)

    model, trainer, _, steps = run(tmp_path, sgd)
    logged = [h for h in trainer.state.log_history if "sgdlab/lr/group0" in h]
    assert len(logged) == len(steps) == 4
    for i, (h, step) in enumerate(zip(logged, steps)):
        lr = h["sgdlab/lr/group0"]
        assert lr == pytest.approx(0.1 * 0.5**i * step["batch_size"] / 4, rel=1e-15)
        n = "transformer.h.1.mlp.c_fc.weight"
        torch.testing.assert_close(
            step["after"][n] - step["before"][n], -lr * step["grad"][n], rtol=1e-12, atol=1e-15
        )


def test_the_trainers_learning_rate_is_the_applied_lr(tmp_path):
    """The Trainer logs its scheduler's lr (group["lr"], at the reference batch size 4) as
    learning_rate after each step: the callback replaces it by the lr the step applies at the
    batch size in force, in log_history and in what report_to integrations receive."""

    def sgd(model):
        opt = sgdlab.SGD(model.parameters(), lr=0.1, batch_size=4, scaling="linear")
        return opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)

    model, trainer, _, steps = run(
        tmp_path, sgd, logging_strategy="steps", logging_steps=1, report_to="tensorboard"
    )
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(logged) == len(steps) == 4
    for i, (lr, step) in enumerate(zip(logged, steps)):
        # logged after the step and the scheduler's: the next step's lr at this batch size
        assert lr == pytest.approx(0.1 * 0.5 ** (i + 1) * step["batch_size"] / 4, rel=1e-12)
    written = [value for _, value in sorted(scalars(tmp_path)["train/learning_rate"])]
    assert written == pytest.approx(logged, rel=1e-6)  # float32 in the event file


def test_optimizer_cls_and_kwargs_and_resume(tmp_path):
    """An sgdlab class through optimizer_cls_and_kwargs; a run resumed from a checkpoint ends
    where the uninterrupted one does, its optimizer state (batch sizes included) restored."""

    def through_cls(tmp, **kw):
        model = gpt2()
        trainer = transformers.Trainer(
            model=model,
            args=args(tmp, **kw),
            train_dataset=dataset(),
            optimizer_cls_and_kwargs=(
                sgdlab.Adam,
                {"lr": 1e-3, "second_moment": "per_example", "batch_size": 8},
            ),
        )
        return model, trainer, SGDLabCallback().attach(trainer)

    full, trainer, _ = through_cls(tmp_path / "a")
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, sgdlab.Adam)
    _, first, _ = through_cls(tmp_path / "b", save_strategy="steps", save_steps=2, max_steps=2)
    first.train()
    ckpt = tmp_path / "b" / "checkpoint-2"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert [g["batch_size"] for g in saved["param_groups"]] == [2, 2]
    resumed, second, callback = through_cls(tmp_path / "b")
    second.train(resume_from_checkpoint=str(ckpt))
    assert callback.driver.steps == 4
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert callback.tracker is None


def test_refusals(tmp_path):
    model = gpt2()
    opt, _ = adam(model)
    trainer = transformers.Trainer(
        model=model,
        args=args(tmp_path, max_grad_norm=1.0),
        train_dataset=dataset(),
        optimizers=(opt, None),
    )
    SGDLabCallback().attach(trainer)
    with pytest.raises(ValueError, match="max_grad_norm=1.0 clips"):
        trainer.train()
    assert all(not hasattr(p, "grad_second_moment") for p in model.parameters())
    trainer = transformers.Trainer(
        model=model,
        args=args(tmp_path),
        train_dataset=dataset(),
        optimizers=(opt, None),
        callbacks=[SGDLabCallback()],
    )
    with pytest.raises(ValueError, match=r"attach\(trainer\)"):
        trainer.train()
