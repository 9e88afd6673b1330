"""Oracles shared by the integration tests: per-example gradients by brute force, event files
read back."""

from __future__ import annotations

from pathlib import Path

import torch


def per_example_grads(model, loss_of, examples):
    """``{name: [B, *shape]}``: the gradient of each example's own loss (an autograd loop)."""
    out = {n: [] for n, p in model.named_parameters() if p.requires_grad}
    for ex in examples:
        model.zero_grad(set_to_none=True)
        loss_of(ex).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                out[n].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}


def scalars(log_dir):
    """``{tag: [(step, value), ...]}`` of every TensorBoard event file under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found
