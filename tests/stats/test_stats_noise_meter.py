"""Gradient-noise meter on problems where Sigma and G are known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sgdlab.stats as stats

G = torch.tensor([0.5, -1.0, 0.25, 2.0, 0.0], dtype=torch.float64)
SD = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0], dtype=torch.float64)


def test_estimators_are_unbiased():
    """R independent batches of B per-example gradients g_b = G + SD * xi: mean estimates of
    tr Sigma and |G|^2 against the truth, |z| < 4."""
    R, B = 20000, 8
    gen = torch.Generator().manual_seed(0)
    g = G + SD * torch.randn(R, B, 5, generator=gen, dtype=torch.float64)
    tr, sq = stats.noise_statistics([g.mean(1)], [(g * g).mean(1)], B, dim=-1)
    for est, truth in ((tr, SD.pow(2).sum()), (sq, G.pow(2).sum())):
        z = (est.mean() - truth) / (est.std() / math.sqrt(R))
        assert abs(float(z)) < 4


def test_trace_is_the_unbiased_sample_variance():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
    tr, sq = stats.noise_statistics([g.mean(0)], [(g * g).mean(0)], 6)
    assert torch.allclose(tr, g.var(0, unbiased=True).sum(), rtol=1e-12)
    assert torch.allclose(sq, g.mean(0).pow(2).sum() - tr / 6, rtol=1e-12)


class TwoHeads(nn.Module):
    """out_k = w_k (a constant input 1); loss_b = |out - y_b|^2 / 2 gives g_b = w - y_b."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(1, 2, bias=False)
        self.b = nn.Linear(1, 3, bias=False)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], -1)


class Recorder:
    """Collects ``add_scalar`` calls (the SummaryWriter protocol)."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.setdefault(tag, []).append((global_step, float(value)))


def test_meter_through_the_tracker_recovers_sigma_g_and_temperature():
    torch.manual_seed(2)
    model = TwoHeads().double()
    w = torch.cat([model.a.weight.detach().ravel(), model.b.weight.detach().ravel()])
    mu = w - G  # y_b ~ N(mu, SD^2) so that E g_b = G and Cov g_b = diag SD^2
    B, steps, lr = 16, 300, 0.05
    tracker = stats.track(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    writer = Recorder()
    meter = stats.NoiseMeter(opt, batch_size=tracker, writer=writer, beta=0.9)
    readings = []
    for _ in range(steps):
        opt.zero_grad()
        y = mu + SD * torch.randn(B, 5, dtype=torch.float64)
        out = model(torch.ones(B, 1, dtype=torch.float64))
        (0.5 * (out - y).pow(2).sum() / B).backward()
        readings.append(meter())  # no optimizer step: G and Sigma stay fixed
    tr = torch.tensor([r.tr_sigma for r in readings], dtype=torch.float64)
    sq = torch.tensor([r.grad_sq_norm for r in readings], dtype=torch.float64)
    for est, truth in ((tr, SD.pow(2).sum()), (sq, G.pow(2).sum())):
        assert abs(float((est.mean() - truth) / (est.std() / math.sqrt(steps)))) < 4
    # per-parameter-group variance: one optimizer group here; per module via a mapping
    per_module = stats.NoiseMeter(
        {"a": [model.a.weight], "b": [model.b.weight]}, batch_size=B, lr=lr
    )
    r = per_module.update()
    assert r.tr_sigma_groups["a"] + r.tr_sigma_groups["b"] == pytest.approx(readings[-1].tr_sigma)
    assert r.temperature == pytest.approx(lr * r.tr_sigma / (2 * B))
    assert r.temperature_groups["a"] == pytest.approx(lr * r.tr_sigma_groups["a"] / (2 * B))
    # smoothing: ratio of Adam-debiased moving averages of numerator and denominator
    beta, n = 0.9, len(readings)
    wts = torch.tensor([(1 - beta) * beta ** (n - 1 - i) for i in range(n)], dtype=torch.float64)
    debias = 1 - beta**n
    assert readings[-1].b_simple_smoothed == pytest.approx(
        float((wts * tr).sum() / debias) / float((wts * sq).sum() / debias), rel=1e-10
    )
    assert readings[-1].temperature == pytest.approx(lr * readings[-1].tr_sigma / (2 * B))
    assert [s for s, _ in writer.scalars["noise/b_simple"]] == list(range(steps))
    assert writer.scalars["noise/tr_sigma/group0"][-1][1] == pytest.approx(readings[-1].tr_sigma)
    tracker.detach()


def test_meter_errors():
    lin = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="batch_size"):
        stats.NoiseMeter(lin, batch_size="16")
    with pytest.raises(ValueError, match="beta"):
        stats.NoiseMeter(lin, batch_size=4, beta=1.0)
    with pytest.raises(TypeError, match="add_scalar"):
        stats.NoiseMeter(lin, batch_size=4, writer=object())
    meter = stats.NoiseMeter(lin, batch_size=4)
    lin(torch.randn(4, 2)).sum().backward()
    with pytest.raises(ValueError, match="grad_second_moment"):
        meter.update()
    with pytest.raises(ValueError, match=">= 2"):
        stats.noise_statistics([torch.ones(2)], [torch.ones(2)], 1)
    with pytest.raises(ValueError, match=">= 2 to estimate a variance"):
        stats.NoiseMeter(lin, batch_size=1)
    with pytest.raises(TypeError, match="iterable of parameters"):
        stats.NoiseMeter("abc", batch_size=4)
    with pytest.raises(TypeError, match=r"groups\['a'\] must be an iterable of parameters"):
        stats.NoiseMeter({"a": lin.weight}, batch_size=4)  # its rows were taken as parameters
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        meter.update(step=-5)


def test_meter_matches_per_example_gradients_in_float32_with_a_sparse_embedding():
    """A float32 model with a sparse embedding gradient and a scalar parameter, grouped three
    ways (one group, per parameter, per module): every reading against the float64 sums of
    per-example gradients, and the float64 work in buffers of the largest tensor's size."""
    from stats_brute import per_example_grads

    from sgdlab.stats.noise import _scratch

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(12, 4, sparse=True)
            self.lin = nn.Linear(12, 2)
            self.gain = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.gain * self.lin(self.emb(x).flatten(1))

    torch.manual_seed(3)
    B = 10
    net = Net()
    x, y = torch.randint(0, 12, (B, 3)), torch.randn(B, 2)
    per = per_example_grads(
        net.double(), lambda out, t: 0.5 * (out - t).pow(2).sum(), x, y.double()
    )
    per = [g.to_dense() if g.is_sparse else g for g in per]
    net.float()
    tr_true = sum(float(g.var(0, unbiased=True).sum()) for g in per)
    sq_true = sum(float(g.mean(0).pow(2).sum()) for g in per) - tr_true / B
    with pytest.warns(UserWarning, match=r"<root> \(Net\)"):  # gain: the torch.func fallback
        tracker = stats.track(net)
    (0.5 * (net(x) - y).pow(2).sum() / B).backward()
    assert net.emb.weight.grad.is_sparse
    groupings = [
        {"all": list(net.parameters())},
        net,
        {"emb": [net.emb.weight], "rest": [*net.lin.parameters(), net.gain]},
    ]
    for groups in groupings:
        r = stats.NoiseMeter(groups, batch_size=B).update()
        assert r.tr_sigma == pytest.approx(tr_true, rel=1e-5)
        assert r.grad_sq_norm == pytest.approx(sq_true, rel=1e-5)
        assert sum(r.tr_sigma_groups.values()) == pytest.approx(r.tr_sigma, rel=1e-12)
    ((bg, bd),) = _scratch(p.grad for p in net.parameters()).values()
    assert bg.dtype == bd.dtype == torch.float64
    assert bg.numel() == bd.numel() == max(p.numel() for p in net.parameters())
    tracker.detach()


def test_optimizer_groups_with_the_same_name_are_refused():
    """Two groups named alike were one entry of a dict: the meter covered the last group only,
    with the first one's learning rate."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "name": "g", "lr": 0.1},
            {"params": model[1].parameters(), "name": "g", "lr": 1.0},
        ]
    )
    with pytest.raises(ValueError, match=r"same name \['g'\]"):
        stats.NoiseMeter(opt, batch_size=4)
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "name": "group1"}, {"params": model[1].parameters()}],
        lr=0.1,
    )  # default name group1
    with pytest.raises(ValueError, match="group1"):
        stats.NoiseMeter(opt, batch_size=4)


def test_parameters_without_gradient_are_skipped_and_overflow_steps_kept_out():
    """A frozen parameter (or a whole frozen group) is skipped as torch.optim skips it (it was
    an error that asked to attach the tracker); a step with non-finite gradients is reported
    as it is and kept out of the moving averages (they stayed NaN for good)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "name": "a"},
            {"params": model[2].parameters(), "name": "b"},
        ],
        lr=0.1,
    )
    tracker = stats.track(model)
    meter = stats.NoiseMeter(opt, batch_size=8, beta=0.5)
    x = torch.randn(8, 3, dtype=torch.float64)
    readings = []
    for step in range(4):
        model.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        if step == 1:
            model[2].weight.grad[0, 0] = float("inf")
        readings.append(meter.update())
    assert not math.isfinite(readings[1].tr_sigma)
    assert all(math.isfinite(r.b_simple_smoothed) for r in readings)
    assert meter.updates == 3
    for p in model[0].parameters():  # a whole group frozen
        p.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()
    r = meter.update()
    assert r.tr_sigma_groups["a"] == 0.0
    w = model[2].weight
    expected_t = (w.grad_second_moment - w.grad**2).sum().item() * 8 / 7
    assert r.tr_sigma_groups["b"] == pytest.approx(expected_t, rel=1e-12)
    tracker.detach()


def test_accumulated_micro_batches_need_the_trackers_batch_size():
    """With mean losses over micro-batches, p.grad is a sum of means; without
    tracker.batch_size the meter divided by all examples as if it were one mean (tr Sigma 2x,
    |G|^2 14x off): refused. With it, the concatenated batch's figures."""
    torch.manual_seed(6)
    model = nn.Linear(3, 2).double()
    x = torch.randn(15, 3, dtype=torch.float64)
    tracker = stats.track(model)
    meter = stats.NoiseMeter(model, batch_size=tracker)
    for chunk in x.split(5):
        model(chunk).pow(2).mean().backward()
    with pytest.raises(ValueError, match="tracker.batch_size"):
        meter.update()
    model.zero_grad(set_to_none=True)
    tracker.batch_size = 15
    for chunk in x.split(5):
        (model(chunk).pow(2).sum() / 15).backward()
    r = meter.update()
    per = torch.stack(
        [
            torch.cat(
                [
                    g.flatten()
                    for g in torch.autograd.grad(
                        model(x[b : b + 1]).pow(2).sum(), list(model.parameters())
                    )
                ]
            )
            for b in range(15)
        ]
    )
    mean = per.mean(0)
    assert r.tr_sigma == pytest.approx(
        ((per - mean) ** 2).sum(1).mean().item() * 15 / 14, rel=1e-10
    )
    tracker.detach()


def _least_squares(B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(B, 4, generator=gen, dtype=torch.float64)
    return X, X @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64) + torch.randn(
        B, generator=gen, dtype=torch.float64
    )


def _closed_form(model: nn.Linear, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Loss (1/B) sum_b (x_b.w - y_b)^2 / 2 at fixed w: g_b = r_b x_b with r = Xw - y, so
    tr Sigma_hat = sum_i of the unbiased variance of r_b x_bi, |G|^2_hat = |g_bar|^2 - tr/B."""
    g = (X @ model.weight.detach().ravel() - y)[:, None] * X
    tr = float(g.var(0, unbiased=True).sum())
    return tr, float(g.mean(0).pow(2).sum()) - tr / len(X)


def _backward(model: nn.Linear, X: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    (0.5 * (model(X).ravel() - y).pow(2).mean()).backward()


def test_meter_follows_the_batch_size():
    """tr Sigma and |G|^2 of least-squares batches of 32 then 128 at fixed parameters against
    the closed form. The meter kept the B it was built with (B_simple -1925 at 128): now it
    follows the tracker's pass, else the optimizer's batch size, else the fixed number, and
    an assignment to meter.batch_size that would be ignored is refused."""
    import sgdlab

    model = nn.Linear(4, 1, bias=False).double()
    opt = sgdlab.SGD(model.parameters(), lr=0.1, batch_size=32)
    tracker = stats.track(model)
    by_opt = stats.NoiseMeter(opt, batch_size=32)
    by_fixed = stats.NoiseMeter(model, batch_size=32)  # the tracker takes precedence
    for B, seed in ((32, 0), (128, 1), (32, 2)):
        X, y = _least_squares(B, seed)
        opt.set_batch_size(B)
        _backward(model, X, y)
        for meter in (by_opt, by_fixed):
            r = meter.update()
            assert (r.tr_sigma, r.grad_sq_norm) == pytest.approx(
                _closed_form(model, X, y), rel=1e-10
            )
            assert r.batch_size == B
    assert by_opt.batch_size == by_fixed.batch_size == 32
    with pytest.raises(AttributeError, match="tracker of its parameters"):
        by_fixed.batch_size = 64
    assert by_fixed.batch_size == 32
    # without a tracker (moments kept after detach): the optimizer's current batch size
    X, y = _least_squares(128, 3)
    _backward(model, X, y)
    tracker.detach(clear=False)
    tr, _ = _closed_form(model, X, y)
    opt.step(batch_size=128)  # stays in force, as set_batch_size (the gradients stay)
    assert by_opt.batch_size == 128
    assert by_opt.update().tr_sigma == pytest.approx(tr, rel=1e-10)
    with pytest.raises(AttributeError, match="optimizer.set_batch_size"):
        by_opt.batch_size = 32
    assert by_opt.batch_size == 128
    # neither: the fixed number, which an assignment sets
    assert by_fixed.batch_size == 32
    by_fixed.batch_size = 128
    r = by_fixed.update()
    assert (r.batch_size, r.tr_sigma) == pytest.approx((128, tr), rel=1e-10)
    with pytest.raises(ValueError, match=r"meter.batch_size must be >= 2.*got 1"):
        by_fixed.batch_size = 1
    assert by_fixed.batch_size == 128
    unsized = stats.NoiseMeter(model)
    with pytest.raises(ValueError, match="no batch size"):
        unsized.update()
    assert unsized.step == 0 and unsized.history == []


def test_temperature_uses_the_lr_the_step_applies():
    """T = eta tr Sigma / (2B) with eta the lr the step applies: lr = 0.1 tuned at B0 = 8 is
    0.4 at B = 32 under the linear rule (the meter used group["lr"], 0.1: T 4x too small)."""
    import sgdlab

    model = nn.Linear(4, 1, bias=False).double()
    opt = sgdlab.SGD(model.parameters(), lr=0.1, ref_batch_size=8, batch_size=32)
    with stats.track(model):
        meter = stats.NoiseMeter(opt)
        X, y = _least_squares(32, 0)
        _backward(model, X, y)
        r = meter.update()
    assert r.temperature == pytest.approx(0.4 * r.tr_sigma / (2 * 32), rel=1e-14)
