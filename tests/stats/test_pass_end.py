"""The end-of-pass signal (``Tracker.on_pass_end``): once per backward pass that wrote
statistics, after they are written, with the examples the pass saw and the parameters it gave
statistics; never for a pass that raised (its statistics are never written) or recorded no
call. Oracle: the brute-force per-example loop in float64 read inside the subscriber."""

from __future__ import annotations

import pytest
import torch
from stats_brute import per_example_grads, rel_err
from torch import nn

from sgdlab import stats

DT = torch.float64


def sq_loss(out, y):
    return 0.5 * (out - y).pow(2).sum()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)


def test_each_pass_signals_its_examples_and_written_statistics():
    model = _model()
    model[2].bias.requires_grad_(False)
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    seen = []
    per = per_example_grads(model, sq_loss, x[:4], y[:4])
    tracker = stats.track(model)

    def read(summary):  # statistics are written before the signal
        seen.append(
            (
                summary.num_examples,
                summary.parameters,
                [p.grad_second_moment.clone() for p in summary.parameters],
            )
        )

    handle = tracker.on_pass_end(read)
    (sq_loss(model(x[:4]), y[:4]) / 4).backward()
    (sq_loss(model(x[4:]), y[4:]) / 2).backward()
    assert [n for n, _, _ in seen] == [4, 2]
    tracked = [p for p in model.parameters() if p.requires_grad]
    assert all(
        len(ps) == 3 and all(a is b for a, b in zip(ps, tracked, strict=True)) for _, ps, _ in seen
    )
    for m, g in zip(seen[0][2], per, strict=True):
        assert rel_err(m, (g * g).mean(0)) < 1e-10
    handle.remove()
    model.zero_grad()
    (sq_loss(model(x), y) / 6).backward()
    assert len(seen) == 2
    tracker.detach()


def test_a_failed_pass_signals_nothing_and_the_next_one_does():
    model = _model()
    x, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    seen = []
    per = per_example_grads(model, sq_loss, x, y)
    tracker = stats.track(model)
    tracker.on_pass_end(seen.append)
    h = model[1](model[0](x))
    h.register_hook(lambda g: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        (sq_loss(model[2](h), y) / 4).backward()
    assert seen == []
    assert all(getattr(p, "grad_second_moment", None) is None for p in model.parameters())
    model.zero_grad()
    (sq_loss(model(x), y) / 4).backward()
    assert [s.num_examples for s in seen] == [4]
    for p, g in zip(model.parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    tracker.detach()


def test_a_pass_that_records_no_call_signals_nothing():
    model = _model()
    x = torch.randn(4, 3, dtype=DT)
    seen = []
    tracker = stats.track(model)
    tracker.on_pass_end(seen.append)
    with tracker.paused():
        model(x).sum().backward()
    assert seen == []
    with pytest.raises(TypeError, match="on_pass_end needs a callable, got int"):
        tracker.on_pass_end(3)
    tracker.detach()
