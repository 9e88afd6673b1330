"""Dropout and random draws inside a module on the ``torch.func`` fallback: the per-example
rerun applies the masks and draws of the batched forward pass (element, channel and alpha
dropout, in place or not, a dropped-out weight shared by the batch, stochastic depth, noise).
Oracle in float64: per-example gradients of the same batched graph, both passes seeded
alike."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from stats_brute import assert_statistics, rel_err, same_graph_grads
from torch import nn

import sgdlab.stats as stats

B = 5


class Noisy(nn.Module):
    """Direct parameters (so the fallback) and every kind of dropout call."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) * 0.5)
        self.g = nn.Parameter(torch.ones(4))
        self.drop = nn.Dropout(0.3)
        self.channels = nn.Dropout1d(0.4)
        self.alpha = nn.AlphaDropout(0.2)

    def forward(self, x):
        h = torch.tanh(self.drop(x) @ self.w)  # [B, T, 4]
        h = self.channels(h.transpose(1, 2)).transpose(1, 2)
        h = self.alpha(h) * self.g
        h = F.dropout(h, 0.25, training=self.training, inplace=True)
        shared = F.dropout(self.w, 0.5, training=self.training)  # one mask for the batch
        return (h @ shared).sum(1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), Noisy(), nn.Linear(4, 2)).double()


def _run(model, x):
    return model(x).pow(2).sum(1)


@pytest.mark.parametrize("budget", [None, 256], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fallback_applies_the_forward_pass_masks(reduction, budget):
    model = _model()
    x = torch.randn(B, 6, 3, dtype=torch.float64)
    params = list(model.parameters())
    torch.manual_seed(7)
    losses = _run(model, x)
    per = same_graph_grads(losses, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = stats.track(
            model, reduction=reduction, per_example_norms=True, memory_budget=budget
        )
    torch.manual_seed(7)
    total = _run(model, x).sum()
    (total / B if reduction == "mean" else total).backward()
    assert_statistics(model, per, tracker)
    tracker.detach()


def test_random_stream_and_eval_mode():
    """The training run draws the same numbers as without the tracker; in eval mode nothing
    is drawn or recorded and the statistics are those of the deterministic module."""
    plain, tracked = _model(), _model()
    x = torch.randn(B, 6, 3, dtype=torch.float64)
    draws = []
    for model in (plain, tracked):
        if model is tracked:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tracker = stats.track(model)
        torch.manual_seed(3)
        _run(model, x).mean().backward()
        draws.append(torch.rand(3))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    for a, b in zip(plain.parameters(), tracked.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    tracked.eval()
    tracked.zero_grad(set_to_none=True)
    from stats_brute import per_example_grads

    per = per_example_grads(tracked, lambda out, y: out.pow(2).sum(), x, x)
    _run(tracked, x).mean().backward()
    for p, g in zip(tracked.parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    tracker.detach()


def _drop_path(x, p, training):
    """Stochastic depth as image models write it: one draw per example, in place."""
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    r = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * r.div_(keep)


class Root(nn.Module):
    """A model with direct parameters (a class token and a position embedding: the fallback
    over the whole model), stochastic depth in its blocks and noise injection."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 6, 4) * 0.1)
        self.cls = nn.Parameter(torch.zeros(1, 1, 4))
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x + self.pos[:, 1:]], 1)
        for block in self.blocks:
            x = x + _drop_path(torch.tanh(block(x)), 0.3, self.training)
        x = x + 0.01 * torch.randn_like(x)
        return x.mean(1)


def test_stochastic_depth_and_noise_are_replayed():
    torch.manual_seed(0)
    model = nn.Sequential(Root(), nn.Linear(4, 2)).double()
    x = torch.randn(B, 5, 4, dtype=torch.float64)
    params = list(model.parameters())
    torch.manual_seed(3)
    losses = model(x).pow(2).sum(1)
    per = same_graph_grads(losses, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = stats.track(model, reduction="sum", per_example_norms=True)
    torch.manual_seed(3)
    model(x).pow(2).sum().backward()
    assert_statistics(model, per, tracker)
    tracker.detach()
