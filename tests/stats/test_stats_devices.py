"""The augmented backward on each device (CUDA skipped without one): every rule the benchmark's
models use, the deferred 2-D ``nn.Linear`` lane included, against the brute-force per-example
loop in float64 on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stats_brute import per_example_grads, rel_err
from test_stats_models import Block
from torch import nn

import sgdlab.stats as stats

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]
B = 8


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 12), nn.ReLU(), nn.Linear(12, 12),
                                  nn.ReLU(), nn.Linear(12, 5)),
            lambda: torch.randn(B, 1, 6, 6)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(54, 5)),
            lambda: torch.randn(B, 1, 6, 6)),
    "block": (lambda: nn.Sequential(Block(16), nn.Flatten(), nn.Linear(7 * 16, 5)),
              lambda: torch.randn(B, 7, 16)),
}


def loss_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize("budget", [2**25, 1], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("device", DEVICES)
def test_statistics_match_the_cpu_brute_force(device, name, budget):
    make, make_x = MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    x = make_x().double()
    y = torch.randint(0, 5, (B,))
    per = per_example_grads(model, loss_sum, x, y)
    model = model.to(device)
    tracker = stats.track(model, memory_budget=budget)
    (loss_sum(model(x.to(device)), y.to(device)) / B).backward()
    for (pname, p), g in zip(model.named_parameters(), per, strict=True):
        assert p.grad_second_moment.device == p.device
        assert rel_err(p.grad_second_moment.cpu(), (g * g).mean(0)) < 1e-10, pname
    tracker.detach()


def _deep_mlp():
    """Six Linear layers (two launches of the fused kernel on a GPU), one without bias."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(36, 70)]
    for n_in, n_out, bias in [(70, 65, True), (65, 17, False), (17, 33, True), (33, 9, True)]:
        layers += [nn.Tanh(), nn.Linear(n_in, n_out, bias=bias)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(9, 5))


def _convs():
    """Stride, dilation, a non-square kernel, asymmetric padding, a reflect-padded 'same'
    convolution without bias."""
    return nn.Sequential(
        nn.Conv2d(1, 5, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 1)), nn.ReLU(),
        nn.Conv2d(5, 4, 3, bias=False, padding="same", padding_mode="reflect"), nn.Tanh(),
        nn.Flatten(), nn.Linear(96, 5),
    )


@pytest.mark.parametrize("batch", [8, 45])
@pytest.mark.parametrize("name", ["mlp", "cnn", "deep", "convs", "block"])
@pytest.mark.parametrize("device", DEVICES)
def test_float32_statistics_match_the_float64_brute_force(device, name, batch):
    """float32 parameters: on a GPU with Triton the 2-D Linear calls take the fused kernel
    (sgdlab.stats._fused_linear); every path (the block: Linear on sequences, LayerNorm,
    attention) must agree with float64 to fp32 rounding."""
    from sgdlab.stats import _fused_linear

    make = {"deep": _deep_mlp, "convs": _convs}.get(name) or MODELS[name][0]
    torch.manual_seed(1)
    model = make().double()
    x = torch.randn(batch, *((7, 16) if name == "block" else (1, 6, 6)), dtype=torch.float64)
    y = torch.randint(0, 5, (batch,))
    per = per_example_grads(model, loss_sum, x, y)
    model = model.float().to(device)
    xd = x.float().to(device)
    if device == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            has_triton = False
        else:
            has_triton = True
        assert _fused_linear.available(xd, torch.float32) == has_triton
    tracker = stats.track(model)
    (loss_sum(model(xd), y.to(device)) / batch).backward()
    for (pname, p), g in zip(model.named_parameters(), per, strict=True):
        assert p.grad_second_moment.dtype == torch.float32
        assert rel_err(p.grad_second_moment.double().cpu(), (g * g).mean(0)) < 2e-6, pname
    tracker.detach()
