"""Unit tests of the pass object (``_pass.Pass``) and of the calls held for its end
(``_deferred.Deferred``), on a real tracker's entries. Oracles: the closed form
m = scale * sum_b (sum_uses v_b)^2, and the Linear rule's moments by the brute-force loop."""

from __future__ import annotations

import pytest
import torch
from stats_brute import per_example_grads, rel_err
from torch import nn

from sgdlab import stats
from sgdlab.stats._base import Contribution
from sgdlab.stats._pass import Pass
from sgdlab.stats._record import Record

DT = torch.float64


def test_uses_are_summed_per_example_before_squaring():
    lin = nn.Linear(3, 2).to(DT)
    tracker = stats.track(lin)
    state = Pass(tracker)
    entry = tracker._entries[lin]
    state.check_batch(entry, 4)  # mean over N = 4: scale 4
    v1, v2 = torch.randn(4, 2, 3, dtype=DT), torch.randn(4, 2, 3, dtype=DT)
    state.add(lin.weight, Contribution(per_example=v1), "lin")
    state.add(lin.weight, Contribution(per_example=v2), "lin")
    nscale = state.reduce(tracker._params, None)
    assert torch.equal(state.moments[id(lin.weight)], ((v1 + v2) ** 2).sum(0).mul_(4.0))
    assert nscale == 16.0
    with pytest.raises(ValueError, match="inconsistent batch sizes.*batch dimension 5"):
        state.check_batch(entry, 5)
    with pytest.raises(RuntimeError, match="used only once"):
        state.add(lin.bias, Contribution(moment=torch.ones(2, dtype=DT)), "lin")
        state.add(lin.bias, Contribution(per_example=torch.ones(4, 2, dtype=DT)), "lin")
    tracker.detach()


@pytest.mark.parametrize("budget", [10**9, 1], ids=["at-end", "over-budget"])
def test_deferred_calls_give_the_linear_moments(budget):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    per = per_example_grads(lin, lambda o, t: 0.5 * (o - t).pow(2).sum(), x, y)
    tracker = stats.track(lin, memory_budget=budget)
    state = Pass(tracker)
    entry = tracker._entries[lin]
    state.check_batch(entry, 5)
    d = (lin(x) - y).detach() / 5  # the output gradient of the mean loss
    record = Record(
        entry, (x,), {}, (x._version,), (x,), 5, {id(lin.weight): 1, id(lin.bias): 1}, None, (0,)
    )
    state.deferred.add(state, record, d, None, x.nbytes + d.nbytes)
    assert len(state.deferred.items) == (0 if budget == 1 else 1)  # flushed once over budget
    state.deferred.flush(state)
    state.reduce(tracker._params, None)
    for p, g in zip(lin.parameters(), per, strict=True):
        assert rel_err(state.moments[id(p)], (g * g).mean(0)) < 1e-12
    tracker.detach()
