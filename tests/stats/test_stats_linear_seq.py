"""The short path of ``nn.Linear`` calls on ``[B, T..., in]`` (``linear_seq_moments``): exact
against the brute-force per-example loop, the same numbers as the general rule, and handed to
the general rule where it does not apply (a call too large for one chunk, a shared weight)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from stats_brute import per_example_grads, rel_err
from torch import nn

import sgdlab.stats as stats
from sgdlab.stats.linear import linear_seq_moments

B = 6


def sq_loss(out, y):
    return 0.5 * (out - y).pow(2).sum()


class Stack(nn.Module):
    """Two Linear layers on a sequence, the second used twice (a shared weight)."""

    def __init__(self, share: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 5)
        self.share = share

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = self.b(h)
        return self.b(torch.tanh(h)) if self.share else h


@pytest.fixture
def spy():
    """Counts the calls that the short path computes (``None`` results not counted): the
    Linear rule registered again with a counting ``linear_seq_moments``."""
    calls = []
    rule = stats.rule_for(nn.Linear(1, 1))

    def counted(*args):
        out = linear_seq_moments(*args)
        if out is not None:
            calls.append(args[0])
        return out

    handle = stats.register(nn.Linear, replace(rule, fast=replace(rule.fast, more=counted)))
    yield calls
    handle.remove()


@pytest.mark.parametrize("shape", [(B, 3, 4), (B, 1, 4), (B, 2, 3, 4)], ids=["T3", "T1", "4d"])
@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
@pytest.mark.parametrize("budget", [None, 1], ids=["one-chunk", "general-rule"])
def test_matches_brute_force(shape, frozen, budget, spy):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    if frozen:
        getattr(model[0], frozen).requires_grad_(False)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape[:-1], 2, dtype=torch.float64)
    per = per_example_grads(model, sq_loss, x, y)
    tracker = stats.track(model, memory_budget=budget)
    (sq_loss(model(x), y) / B).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p, g in zip(trainable, per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    if frozen:
        assert not hasattr(getattr(model[0], frozen), "grad_second_moment")
    # the short path takes both calls unless the budget forbids one chunk of per-example
    # weight gradients (a layer with a frozen weight has none)
    expected = [model[2], model[0]] if budget is None else [model[0]] if frozen == "weight" else []
    assert spy == expected  # in the order of the backward pass
    tracker.detach()


def test_same_numbers_as_the_general_rule(spy):
    """Same kernels as ``linear_rule`` on one chunk, so the moments are bitwise equal;
    ``per_example_norms=True`` sends every call through the general rule."""
    torch.manual_seed(6)
    models = [nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randn(B, 7, 8), torch.randn(B, 7, 3)
    trackers = [stats.track(models[0]), stats.track(models[1], per_example_norms=True)]
    for m in models:
        (sq_loss(m(x), y) / B).backward()
    assert len(spy) == 2  # the first model's two calls
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p.grad_second_moment, q.grad_second_moment)
    for t in trackers:
        t.detach()


def test_shared_weight_takes_the_general_rule(spy):
    torch.manual_seed(7)
    model = Stack(share=True).double()
    x = torch.randn(B, 3, 4, dtype=torch.float64)
    y = torch.randn(B, 3, 5, dtype=torch.float64)
    per = per_example_grads(model, sq_loss, x, y)
    tracker = stats.track(model)
    (sq_loss(model(x), y) / B).backward()
    for p, g in zip(model.parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    assert spy == [model.a]  # b's two calls are summed per example first
    tracker.detach()


def test_mixed_precision_input_accumulates_in_the_parameter_dtype():
    """A bfloat16 input (autocast-style) on a float64 layer: moments in float64, equal to
    those of the float64 input with the same bfloat16 values."""
    torch.manual_seed(8)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(B, 5, 4).to(torch.bfloat16)
    d = torch.randn(B, 5, 3, dtype=torch.float64)
    got = linear_seq_moments(lin, x, d, 2.0, 2**30, True, True)
    ref = linear_seq_moments(lin, x.double(), d, 2.0, 2**30, True, True)
    assert all(g.dtype == torch.float64 for g in got)
    assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True))
    assert linear_seq_moments(lin, x, d, 2.0, 1, True, True) is None
