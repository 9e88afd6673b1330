"""In-place operations on a tracked call's outputs (``nn.ReLU(inplace=True)``, ``out.mul_``,
in place on a slice): the statistics see the gradient of each output as the call returned it.

Outputs that are views (``nn.Linear`` on ``[B, T, in]`` with a bias, ``Bilinear`` without one,
``InstanceNorm`` with affine parameters, the outputs of recurrent layers, attention and cells)
are rebased by an in-place operation, which bypassed the node the tracker listened at: the
statistics were missing without an error, wrong when the layer was used twice (88% off), or
a misleading coverage error in a larger model. Oracle in float64: per-example gradients of
the same batched graph."""

from __future__ import annotations

import warnings

import pytest
import torch
from stats_brute import assert_statistics, same_graph_grads
from torch import nn

import sgdlab.stats as stats

B, T, D = 4, 3, 5


class Twice(nn.Module):
    """A Linear on ``[B, T, D]`` used twice, an in-place ReLU after the first use."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.lin(self.act(self.lin(x)))


class Block(nn.Module):
    """A transformer-style MLP with an in-place activation, after an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


class ViewOut(nn.Module):
    """A module of one's own (the fallback) whose output is a view."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, D))

    def forward(self, x):
        return (x @ self.w).transpose(1, 2)


CASES = {
    "linear [B,T,in], relu_": (lambda: nn.Linear(D, D), lambda m, x: m(x).relu_()),
    "linear [B,T,in], slice mul_": (
        lambda: nn.Linear(D, D),
        lambda m, x: m(x).select(1, 0).mul_(3.0),
    ),
    "linear used twice": (Twice, lambda m, x: m(x)),
    "mlp block": (Block, lambda m, x: m(x)),
    "bilinear, no bias": (lambda: nn.Bilinear(D, D, 4, bias=False), lambda m, x: m(x, x).relu_()),
    "instance norm": (lambda: nn.InstanceNorm1d(T, affine=True), lambda m, x: m(x).mul_(2.0)),
    "lstm output": (lambda: nn.LSTM(D, D, batch_first=True), lambda m, x: m(x)[0].relu_()),
    "lstm state": (
        lambda: nn.LSTM(D, D, batch_first=True),
        lambda m, x: m(x)[1][0].mul_(2.0).transpose(0, 1),
    ),
    "gru output": (lambda: nn.GRU(D, D, batch_first=True), lambda m, x: m(x)[0].relu_()),
    "lstm cell": (lambda: nn.LSTMCell(D, D), lambda m, x: m(x[:, 0])[0].relu_()),
    "attention": (
        lambda: nn.MultiheadAttention(D, 1, batch_first=True),
        lambda m, x: m(x, x, x)[0].relu_(),
    ),
    "fallback, view output": (ViewOut, lambda m, x: m(x).relu_()),
}


@pytest.mark.parametrize("norms", [False, True], ids=["short-path", "general-path"])
@pytest.mark.parametrize("name", list(CASES))
def test_in_place_on_outputs(name, norms):
    make, run = CASES[name]
    torch.manual_seed(0)
    m = make().double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    per = same_graph_grads(run(m, x).pow(2).flatten(1).sum(1), list(m.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning
        tracker = stats.track(m, per_example_norms=norms)
    for _ in range(2):  # the first pass (coverage check) and a later one
        m.zero_grad(set_to_none=True)
        run(m, x).pow(2).flatten(1).sum(1).mean().backward()
        assert_statistics(m, per, tracker if norms else None)
    tracker.detach()


def test_outputs_replaced_by_aliases_keep_torch_behaviour():
    """Outputs handed back as aliases (several outputs) share memory and version counter with
    the originals: values, in-place semantics and plain gradients are those without the
    tracker."""
    torch.manual_seed(1)
    m = nn.LSTM(D, D, batch_first=True).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    ref_out, (ref_h, _) = m(x)
    ref = torch.autograd.grad(ref_out.relu().sum() + ref_h.sum(), list(m.parameters()))
    tracker = stats.track(m)
    out, (h, _) = m(x)
    assert torch.equal(out, ref_out) and torch.equal(h, ref_h)
    v = out._version
    out.relu_()
    assert out._version == v + 1
    (out.sum() + h.sum()).backward()
    for p, g in zip(m.parameters(), ref, strict=True):
        assert torch.allclose(p.grad, g, rtol=0, atol=1e-12)
    tracker.detach()
