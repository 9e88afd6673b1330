"""A fast path added for a new layer type in one file (``diagonal_layer.py``, as
docs/extending.md describes): statistics exact against the brute-force per-example loop, the
fast path taken on single uses (and bitwise equal to the general rule, which the same model
takes with ``per_example_norms=True``), the general rule for a layer used twice."""

from __future__ import annotations

import pytest
import torch
from diagonal_layer import CALLS, Diagonal
from stats_brute import per_example_grads, rel_err
from torch import nn

from sgdlab import stats

DT = torch.float64


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.diag = nn.Linear(3, 4), Diagonal(4)

    def forward(self, x):
        return self.diag(torch.tanh(self.diag(self.lin(x))))


def sq_loss(out, y):
    return 0.5 * (out - y).pow(2).sum()


@pytest.mark.parametrize("shape", [(6, 3), (6, 5, 3)], ids=["2d", "seq"])
@pytest.mark.parametrize("frozen", [None, "bias"])
def test_fast_path_of_a_new_layer_matches_brute_force(shape, frozen):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), Diagonal(4)).to(DT)
    if frozen:
        getattr(model[1], frozen).requires_grad_(False)
    twin = nn.Sequential(nn.Linear(3, 4), Diagonal(4)).to(DT)
    twin.load_state_dict(model.state_dict())
    if frozen:
        getattr(twin[1], frozen).requires_grad_(False)
    x = torch.randn(*shape, dtype=DT)
    y = torch.randn(*shape[:-1], 4, dtype=DT)
    per = per_example_grads(model, sq_loss, x, y)
    fast, slow = stats.track(model), stats.track(twin, per_example_norms=True)
    CALLS.clear()
    for m in (model, twin):
        (sq_loss(m(x), y) / shape[0]).backward()
    assert CALLS == [model[1]]
    tracked = [p for p in model.parameters() if p.requires_grad]
    for p, q, g in zip(
        tracked, [q for q in twin.parameters() if q.requires_grad], per, strict=True
    ):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
        assert torch.equal(p.grad_second_moment, q.grad_second_moment)
    fast.detach()
    slow.detach()


def test_a_layer_used_twice_takes_the_general_rule():
    torch.manual_seed(2)
    model = Twice().to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 4, dtype=DT)
    per = per_example_grads(model, sq_loss, x, y)
    CALLS.clear()
    with stats.track(model):
        (sq_loss(model(x), y) / 5).backward()
        assert CALLS == []
        for p, g in zip(model.parameters(), per, strict=True):
            assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
