"""A parameter that a module registers as its own and one of its submodules too (Opacus's
DPRNN/DPGRU/DPLSTM name their cells' weights ``weight_ih_l0``...; ``self.w = self.lin.weight``)
is counted once per use, whatever number of modules name it.

Oracle: the brute-force per-example loop in float64 (rel. error <= 1e-10), statistics and
per-example norms, for mean and sum reductions."""

from __future__ import annotations

import pytest
import torch
from stats_brute import per_example_grads, rel_err
from torch import nn

from sgdlab import stats

DT = torch.float64


class Alias(nn.Module):
    """A Linear whose weight the module also registers as ``w``; ``calls``: how many times
    the forward calls it (a parameter registered in two places, used once or twice)."""

    def __init__(self, calls: int = 1) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.w = self.lin.weight
        self.calls = calls

    def forward(self, x):
        for _ in range(self.calls):
            x = torch.tanh(self.lin(x))
        return x


class DPRNNLike(nn.Module):
    """An Elman RNN of two Linear cells stepped over time (batch first), whose weights the
    module registers again under ``nn.RNN``'s names, as Opacus's DPRNN does for its state
    dict."""

    def __init__(self, d_in: int = 3, d_h: int = 4) -> None:
        super().__init__()
        self.ih, self.hh = nn.Linear(d_in, d_h), nn.Linear(d_h, d_h, bias=False)
        self.weight_ih_l0, self.bias_ih_l0 = self.ih.weight, self.ih.bias
        self.weight_hh_l0 = self.hh.weight

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.hh.in_features)
        for t in range(x.shape[1]):
            h = torch.tanh(self.ih(x[:, t]) + self.hh(h))
        return h


class Tied(nn.Module):
    """:class:`Alias` and a head that shares its weight: three registrations, two uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Alias()
        self.head = nn.Linear(4, 4)
        self.head.weight = self.body.lin.weight

    def forward(self, x):
        return self.head(self.body(x))


def _model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    if kind == "rnn":
        return nn.Sequential(DPRNNLike(), nn.Linear(4, 2)), torch.randn(5, 3, 3, dtype=DT)
    body = {"once": lambda: Alias(1), "twice": lambda: Alias(2), "tied": Tied}[kind]()
    return nn.Sequential(body, nn.Linear(4, 2)), torch.randn(5, 4, dtype=DT)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["once", "twice", "tied", "rnn"])
def test_a_parameter_named_by_several_modules_counts_once_per_use(kind, reduction):
    torch.manual_seed(0)
    model, x = _model(kind)
    model = model.to(DT)
    y = torch.randn(x.shape[0], 2, dtype=DT)
    per = per_example_grads(model, lambda o, t: ((o - t) ** 2).sum(), x, y)
    tracker = stats.track(model, reduction=reduction, per_example_norms=True)
    assert tracker.fallback_modules == ()  # the cells' own rules, not the outer module's
    loss = ((model(x) - y) ** 2).sum(1)
    (loss.mean() if reduction == "mean" else loss.sum()).backward()
    for (name, p), g in zip(model.named_parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, g.pow(2).mean(0)) <= 1e-10, name
    norms = sum(g.pow(2).flatten(1).sum(1) for g in per)
    assert rel_err(tracker.per_example_sq_norms(), norms) <= 1e-10
    tracker.detach()


def test_a_use_in_the_outer_modules_own_forward_is_refused():
    """The outer module's forward using the shared weight itself: a use outside a call of the
    module whose calls carry the parameter's statistics."""

    class Direct(Alias):
        def forward(self, x):
            return self.lin(x) + x @ self.w.T

    model = Direct().to(DT)
    tracker = stats.track(model)
    with pytest.raises(ValueError, match=r"used outside a call of their module.*w"):
        model(torch.randn(3, 4, dtype=DT)).sum().backward()
    tracker.detach()
