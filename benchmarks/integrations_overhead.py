"""Per-step cost of sgdlab.integrations' callback over the same loop written by hand.

Both loops train a tiny GPT-2 (2 layers, n_embd 32, built from a config) on the CPU with a
per-example Adam, two micro-batches of 8 sequences per step: the hand-written one attaches
``sgdlab.stats.track`` with ``batch_size`` set, reads a ``NoiseMeter`` and calls
``opt.set_batch_size`` itself; the other runs what the Hugging Face callback's
``on_pre_optimizer_step`` runs (its step driver; logging left out) instead. Rounds alternate
between the two; the median of the per-round ratios is printed (target <= 1.03x).

    PYTHONPATH=src python benchmarks/integrations_overhead.py [--rounds 15] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import sgdlab
import sgdlab.stats
from sgdlab.integrations.transformers import SGDLabCallback

T, MICRO, ACCUM = 32, 8, 2


def setup():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=T,
        vocab_size=64,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    opt = sgdlab.Adam(
        model.parameters(), lr=1e-3, second_moment="per_example", batch_size=MICRO * ACCUM
    )
    ids = torch.randint(0, 64, (ACCUM, MICRO, T))
    return model, opt, ids, torch.arange(T).expand(MICRO, T)


def backward(model, ids, pos):
    for j in range(ACCUM):
        out = model(input_ids=ids[j], labels=ids[j], position_ids=pos)
        (out.loss / ACCUM).backward()


def by_hand(steps):
    model, opt, ids, pos = setup()
    tracker = sgdlab.stats.track(model, batch_size=MICRO * ACCUM)
    meter = sgdlab.stats.NoiseMeter(opt, batch_size=tracker)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        backward(model, ids, pos)
        opt.set_batch_size(tracker.num_examples)
        meter.update()
        opt.step()
    elapsed = time.perf_counter() - start
    tracker.detach()
    return elapsed / steps


def with_callback(steps):
    model, opt, ids, pos = setup()
    callback = SGDLabCallback(log_every_n_steps=10**9)  # logging is not the loop's cost
    callback.driver.start(model, opt)  # what on_train_begin does
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        backward(model, ids, pos)
        callback.driver.before_step()  # on_pre_optimizer_step without trainer.log
        opt.step()
    elapsed = time.perf_counter() - start
    callback.driver.end()
    return elapsed / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    a = parser.parse_args()
    torch.set_num_threads(1)
    by_hand(3), with_callback(3)  # warm-up
    ratios, hand, cb = [], [], []
    for r in range(a.rounds):
        first, second = (by_hand, with_callback) if r % 2 == 0 else (with_callback, by_hand)
        t1, t2 = first(a.steps), second(a.steps)
        h, c = (t1, t2) if first is by_hand else (t2, t1)
        hand.append(h), cb.append(c), ratios.append(c / h)
    print(
        f"by hand {statistics.median(hand) * 1e3:.2f} ms/step, callback "
        f"{statistics.median(cb) * 1e3:.2f} ms/step, median ratio "
        f"{statistics.median(ratios):.3f}x over {a.rounds} rounds of {a.steps} steps"
    )


if __name__ == "__main__":
    main()
