"""The Hugging Face Trainer with sgdlab on a tiny GPT-2 built from a config (no download):
per-example Adam, gradient accumulation, a partial last batch and the noise meter in
TensorBoard (docs/integrations.md). Run: python trainer_gpt2_tensorboard.py DIR"""

from __future__ import annotations

import sys

import torch
import transformers

import sgdlab
from sgdlab.integrations.transformers import SGDLabCallback

TEXT = "stochastic gradient descent wanders around the minimum at a temperature. " * 4


def main(out: str) -> None:
    torch.manual_seed(0)
    chars = sorted(set(TEXT))  # a character tokenizer
    ids = torch.tensor([chars.index(c) for c in TEXT])
    T = 16
    blocks = ids[: len(ids) // T * T].view(-1, T)  # 18 sequences: batches 4, 4, 4, 4, 2
    pos = torch.arange(T)  # batched positions: wpe gets per-example gradients
    data = [{"input_ids": b, "labels": b, "position_ids": pos} for b in blocks]
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=T,
        vocab_size=len(chars),
        bos_token_id=None,
        eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    opt = sgdlab.Adam(model.parameters(), lr=3e-3, second_moment="per_example", batch_size=8)
    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=1,
        max_grad_norm=0.0,  # clip with SGDLabCallback(max_grad_norm=...)
        report_to="tensorboard",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, optimizers=(opt, None)
    )
    SGDLabCallback(log_every_n_steps=1, max_grad_norm=1.0).attach(trainer)
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs")
