"""NoiseMeter checkpoints: a meter resumed from ``state_dict`` (through ``torch.save`` /
``torch.load(weights_only=True)``) continues bit for bit like the uninterrupted meter; bad
states are refused with errors naming the key."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import sgdlab.stats as stats


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _backward(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    for p in model.parameters():
        p.grad = None
    nn.functional.mse_loss(model(x), y).backward()


def _through_disk(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("beta", [0.9, 0.0])
def test_resumed_meter_continues_bit_identically(beta):
    """Meters A (uninterrupted) and B read the same backward passes; after 7 updates B is
    saved, a fresh meter C loads it and takes B's place: C's readings equal A's exactly. A
    fresh meter without the state gives different smoothed readings (the state matters)."""
    model = _model()
    tracker = stats.track(model)
    a = stats.NoiseMeter(model, batch_size=12, beta=beta, lr=0.1)
    b = stats.NoiseMeter(model, batch_size=12, beta=beta, lr=0.1)
    for step in range(7):
        _backward(model, step)
        a.update(step)
        b.update(step)
    state = _through_disk(b.state_dict())
    assert state["updates"] == 7 and state["step"] == 7
    c = stats.NoiseMeter(model, batch_size=12, beta=beta, lr=0.1)
    c.load_state_dict(state)
    assert c.history == [] and c.updates == 7 and c.step == 7
    fresh = stats.NoiseMeter(model, batch_size=12, beta=beta, lr=0.1)
    for step in range(7, 15):
        _backward(model, step)
        ra, rc, rf = a.update(), c.update(), fresh.update()
        assert rc == ra  # every field, floats compared exactly
        if beta > 0:
            assert rf.tr_sigma_smoothed != ra.tr_sigma_smoothed
        else:  # no smoothing: nothing to carry
            assert rf.b_simple_smoothed == ra.b_simple_smoothed
    assert c.state_dict() == a.state_dict()
    tracker.detach()


def test_state_holds_plain_numbers():
    model = _model()
    with stats.track(model):
        meter = stats.NoiseMeter(model, batch_size=12)
        _backward(model, 0)
        r = meter.update()
    st = meter.state_dict()
    assert st["ema_tr_sigma"] == pytest.approx((1 - 0.99) * r.tr_sigma, rel=1e-15)
    assert st["ema_grad_sq_norm"] == pytest.approx((1 - 0.99) * r.grad_sq_norm, rel=1e-15)
    assert st["groups"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert st["beta"] == 0.99 and st["format"] == "sgdlab.NoiseMeter/1"


def _state() -> dict:
    model = _model()
    return stats.NoiseMeter(model, batch_size=12).state_dict()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda s: s.pop("updates"), ValueError, "state is missing updates"),
        (lambda s: s.pop("ema_tr_sigma"), ValueError, "missing ema_tr_sigma"),
        (lambda s: s.update(step=1.5), TypeError, r"state\['step'\] must be an int, got float"),
        (lambda s: s.update(updates=True), TypeError, r"state\['updates'\] must be an int"),
        (lambda s: s.update(updates=-1), ValueError, r"state\['updates'\] must be >= 0, got -1"),
        (
            lambda s: s.update(ema_grad_sq_norm="x"),
            TypeError,
            r"state\['ema_grad_sq_norm'\] must be a float, got str",
        ),
        (lambda s: s.update(ema_tr_sigma=math.nan), ValueError, "must be finite, got nan"),
        (lambda s: s.update(ema_grad_sq_norm=math.inf), ValueError, "must be finite, got inf"),
        (
            lambda s: s.update(beta=0.9),
            ValueError,
            "recorded with beta=0.9, this meter has beta=0.99",
        ),
        (lambda s: s.update(groups=["all"]), ValueError, r"holds the groups \['all'\]"),
        (lambda s: s.update(groups="0.weight"), TypeError, "must be a list of group names"),
        (lambda s: s.update(format="other"), ValueError, "format must be"),
    ],
)
def test_bad_states_are_refused_and_leave_the_meter_unchanged(change, error, match):
    model = _model()
    meter = stats.NoiseMeter(model, batch_size=12)
    before = meter.state_dict()
    state = _state()
    change(state)
    with pytest.raises(error, match=match):
        meter.load_state_dict(state)
    assert meter.state_dict() == before


def test_state_must_be_a_mapping():
    meter = stats.NoiseMeter(_model(), batch_size=12)
    with pytest.raises(TypeError, match="state must be a mapping"):
        meter.load_state_dict([1, 2])  # type: ignore[arg-type]
