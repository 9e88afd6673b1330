"""The deferred lane of 2-D ``nn.Linear`` calls (computed together at the end of the backward
pass, or earlier when the stash outgrows ``memory_budget``): same statistics as the general
path and as the brute-force per-example loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stats_brute import per_example_grads, rel_err
from torch import nn

import sgdlab.stats as stats

B = 10


def loss_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def deep_mlp(seed: int = 0) -> nn.Sequential:
    """Layers with and without bias, a frozen weight and a frozen bias."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(5, 7),
        nn.Tanh(),
        nn.Linear(7, 6, bias=False),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).double()
    model[4].weight.requires_grad_(False)
    model[6].bias.requires_grad_(False)
    return model


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 5, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 3, (B,), generator=g)


@pytest.mark.parametrize("budget", [2**25, 1, 700], ids=["one-flush", "flush-each", "flush-some"])
def test_lane_matches_brute_force_under_any_flush_budget(budget):
    model = deep_mlp()
    x, y = data()
    per = per_example_grads(model, loss_sum, x, y)
    tracker = stats.track(model, memory_budget=budget)
    (loss_sum(model(x), y) / B).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(per) == 7
    for (name, p), g in zip(trainable, per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10, name
    assert not hasattr(model[4].weight, "grad_second_moment")
    assert not hasattr(model[6].bias, "grad_second_moment")
    tracker.detach()


def test_lane_equals_general_path_bitwise():
    """Same arithmetic in both paths (entrywise squares, one addmm, one mv per layer)."""
    x, y = data()
    a, b = deep_mlp(), deep_mlp()
    ta = stats.track(a)  # lane
    tb = stats.track(b, per_example_norms=True)  # general path
    for m in (a, b):
        (loss_sum(m(x), y) / B).backward()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        if pa.requires_grad:
            assert torch.equal(pa.grad_second_moment, pb.grad_second_moment)
    ta.detach()
    tb.detach()


def test_shared_weight_in_two_2d_calls_takes_the_per_example_path():
    torch.manual_seed(3)
    lin = nn.Linear(4, 4).double()
    head = nn.Linear(4, 3).double()
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), head)
    x = torch.randn(B, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    per = per_example_grads(model, loss_sum, x, y)
    tracker = stats.track(model, memory_budget=1)
    (loss_sum(model(x), y) / B).backward()
    names = [n for n, _ in model.named_parameters()]
    for name, p, g in zip(names, model.parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10, name
    tracker.detach()


def test_create_graph_backward_gives_the_same_statistics_without_a_graph():
    model = deep_mlp()
    x, y = data()
    per = per_example_grads(model, loss_sum, x, y)
    tracker = stats.track(model)
    (loss_sum(model(x), y) / B).backward(create_graph=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p, g in zip(trainable, per, strict=True):
        assert p.grad.requires_grad  # the gradient carries a graph...
        assert not p.grad_second_moment.requires_grad  # ...the statistic does not
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    tracker.detach()
    for p in trainable:
        p.grad = None


class Residual(nn.Module):
    """2-D residual blocks: the output gradient of each block's last Linear is the same
    tensor autograd hands to the skip connection (a stashed gradient must stay as it was)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.a1, self.a2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b1, self.b2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.a2(torch.tanh(self.a1(h)))
        h = h + self.b2(torch.relu(self.b1(h)))
        return self.out(h)


def test_residual_mlp_matches_brute_force():
    torch.manual_seed(5)
    model = Residual().double()
    x, y = data(6)
    per = per_example_grads(model, loss_sum, x, y)
    tracker = stats.track(model)
    (loss_sum(model(x), y) / B).backward()
    for (name, p), g in zip(model.named_parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10, name
    tracker.detach()


def test_default_memory_budget_follows_the_device():
    """32 MiB chunks for CPU tensors (cache-sized), 128 MiB on an accelerator (fewer launches);
    an explicit budget wins."""
    from sgdlab.stats._pass import default_budget as _default_budget

    assert stats.track(nn.Linear(2, 2)).memory_budget is None
    assert _default_budget(torch.empty(1)) == 2**25
    assert _default_budget(torch.empty(1, device="meta")) == 2**27
    assert stats.track(nn.Linear(2, 2), memory_budget=1000).memory_budget == 1000
