"""The augmented backward under saved-tensor hooks: activation checkpointing (non-reentrant and
reentrant) and offloading (``save_on_cpu``).

Oracles: the brute-force per-example loop in float64 (rel. error <= 1e-10); the statistics of
the same model without checkpointing, bitwise; the module inputs inside a checkpointed region
are freed after the forward pass (a weak reference dies), as they are without the tracker."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from stats_brute import per_example_grads, rel_err
from torch import nn
from torch.utils.checkpoint import checkpoint

from sgdlab import stats
from sgdlab.stats import _pass

DT = torch.float64
MODES = ["none", "non-reentrant", "reentrant", "save_on_cpu"]


def _ck(fn, x, mode):
    if mode in ("non-reentrant", "reentrant"):
        return checkpoint(fn, x, use_reentrant=mode == "reentrant")
    return fn(x)


class Block(nn.Module):
    """Pre-norm attention and MLP on [B, T, d]: LayerNorm, MultiheadAttention (general path,
    three inputs), Linear on sequences."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 3 * d), nn.Linear(3 * d, d)

    def forward(self, x):
        h = self.ln(x)
        x = x + self.att(h, h, h, need_weights=False)[0]
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Seq(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.inp = nn.Linear(5, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = _ck(b, h, self.mode)
        h = _ck(lambda z: self.lstm(z)[0], h, self.mode)
        return self.head(h.mean(1))


class MLP(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.a, self.b, self.c = nn.Linear(6, 9), nn.Linear(9, 9), nn.Linear(9, 3)

    def forward(self, x):
        # reentrant checkpointing needs an input that requires grad: the region starts after a
        h = _ck(lambda z: torch.tanh(self.b(torch.tanh(z))), self.a(x), self.mode)
        return self.c(h)


class CNN(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = _ck(lambda z: self.c2(torch.tanh(self.gn(z))), self.c1(x), self.mode)
        return self.head(h.mean((2, 3)))


def _problem(kind: str, mode: str):
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP(mode).to(DT), torch.randn(7, 6, dtype=DT), torch.randn(7, 3, dtype=DT)
    if kind == "seq":
        return Seq(mode).to(DT), torch.randn(5, 4, 5, dtype=DT), torch.randn(5, 3, dtype=DT)
    return CNN(mode).to(DT), torch.randn(6, 2, 7, 7, dtype=DT), torch.randn(6, 3, dtype=DT)


def _loss(out, y):
    return ((out - y) ** 2).sum(1).mean()


def _step(model, x, y, mode):
    model.zero_grad(set_to_none=True)
    if mode == "save_on_cpu":
        with torch.autograd.graph.save_on_cpu():
            loss = _loss(model(x), y)
    else:
        loss = _loss(model(x), y)
    loss.backward()


@pytest.mark.parametrize("kind", ["mlp", "seq", "cnn"])
@pytest.mark.parametrize("mode", MODES)
def test_exact_under_checkpointing_and_offloading(kind, mode):
    model, x, y = _problem(kind, mode)
    model.mode = "none"
    ref = [
        g.pow(2).mean(0) for g in per_example_grads(model, lambda o, t: ((o - t) ** 2).sum(), x, y)
    ]
    model.mode = mode
    with stats.track(model, warn_fallback=False, per_example_norms=kind == "seq"):
        _step(model, x, y, mode)
        for p, r in zip(model.parameters(), ref, strict=True):
            assert rel_err(p.grad_second_moment, r) <= 1e-10


@pytest.mark.parametrize("kind", ["mlp", "seq", "cnn"])
@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant", "save_on_cpu"])
def test_same_statistics_and_paths_as_without_hooks(kind, mode, monkeypatch):
    """Each call takes the path it takes without checkpointing (a checkpoint's rerun is not
    a second use of the parameters), so the statistics are those of the plain pass: bitwise,
    except that attention's rerun may take another CPU kernel (1e-16 apart on some CPUs)."""
    model, x, y = _problem(kind, "none")
    with stats.track(model, warn_fallback=False):
        _step(model, x, y, "none")
        ref = [p.grad_second_moment.clone() for p in model.parameters()]
        general: list[str] = []
        orig = _pass.Pass.compute_general

        def spy(self, record, d):
            general.append(record.entry.label)
            return orig(self, record, d)

        monkeypatch.setattr(_pass.Pass, "compute_general", spy)
        model.mode = mode
        _step(model, x, y, mode)
        assert general == []
        for (name, p), r in zip(model.named_parameters(), ref, strict=True):
            if ".att." in name:
                assert rel_err(p.grad_second_moment, r) <= 1e-14
            else:
                assert torch.equal(p.grad_second_moment, r)


@pytest.mark.parametrize("kind", ["mlp", "seq", "cnn"])
def test_checkpointed_activations_are_not_kept_alive(kind):
    """The inputs of tracked modules inside a non-reentrant checkpoint are freed after the
    forward pass (the tracker keeps them as autograd keeps its own saved tensors); without
    checkpointing the same probe sees them alive (autograd saves them)."""
    inner = {"mlp": "b", "seq": "blocks.0.fc2", "cnn": "c2"}[kind]
    for mode, alive in (("none", True), ("non-reentrant", False)):
        model, x, y = _problem(kind, mode)
        seen: list[weakref.ref] = []
        probe = model.get_submodule(inner).register_forward_hook(
            lambda m, a, o, seen=seen: seen.append(weakref.ref(a[0]))
        )
        with stats.track(model, warn_fallback=False):
            model.zero_grad(set_to_none=True)
            loss = _loss(model(x), y)
            probe.remove()
            gc.collect()
            assert len(seen) == 1 and (seen[0]() is not None) == alive, mode
            loss.backward()
            assert model.get_submodule(inner).weight.grad_second_moment is not None


@pytest.mark.parametrize("mode", ["none", "non-reentrant"])
def test_paused_first_pass_records_nothing(mode):
    """A paused forward (inside a non-reentrant checkpoint: it saves what the rerun saves, so no
    checkpoint error) records nothing, and its backward pass, the first one, does not take the
    unrecorded calls for parameters used outside their modules; the next pass is recorded."""
    model, x, y = _problem("seq", mode)
    with stats.track(model, warn_fallback=False) as tr:
        with tr.paused():
            loss = _loss(model(x), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        assert all(getattr(p, "grad_second_moment", None) is None for p in model.parameters())
        _step(model, x, y, mode)
        assert all(p.grad_second_moment is not None for p in model.parameters())


def test_retain_graph_recomputes_for_each_pass():
    """Two backward passes through one checkpointed graph (retain_graph): each pass unpacks the
    saved inputs anew (a second recomputation) and adds the same statistics."""
    model, x, y = _problem("mlp", "non-reentrant")
    with stats.track(model):
        _step(model, x, y, "none")
        once = [p.grad_second_moment.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        loss = _loss(model(x), y)
        loss.backward(retain_graph=True)
        loss.backward()
        for p, r in zip(model.parameters(), once, strict=True):
            torch.testing.assert_close(p.grad_second_moment, 2 * r, rtol=1e-12, atol=0)


class Gate(nn.Module):
    """A module without a dedicated rule (the torch.func fallback)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.linspace(-1, 1, n))

    def forward(self, x):
        return x * torch.sigmoid(self.g)


def test_backward_inside_an_offloading_block():
    """The backward pass itself inside ``save_on_cpu``: the rules run without the user's
    saved-tensor hooks (the fallback's torch.func refuses them; the cell rule's recomputation
    would offload its temporaries), exact against the brute force."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(4, 5), Gate(5), nn.Unflatten(1, (1, 5)), nn.LSTM(5, 3, batch_first=True)
    ).to(DT)
    x = torch.randn(6, 4, dtype=DT)

    def loss_sum(out, _):
        return (out[0] ** 2).sum() + out[1][1].sum()

    ref = [g.pow(2).mean(0) for g in per_example_grads(model, loss_sum, x, x)]
    with stats.track(model, warn_fallback=False):
        with torch.autograd.graph.save_on_cpu():
            (loss_sum(model(x), None) / 6).backward()
            assert torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        for p, r in zip(model.parameters(), ref, strict=True):
            assert rel_err(p.grad_second_moment, r) <= 1e-10


class Tail(nn.Module):
    """A head whose last part is a reentrant checkpoint region; ``share``: the region reuses
    ``a`` (used before it too), ``twice``: calls ``b`` twice inside the region, ``regions``:
    ``b`` in two regions."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.ck = True  # False: the same model without checkpointing (the oracle's)
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 5)

    def _ck(self, fn, z):
        return checkpoint(fn, z, use_reentrant=True) if self.ck else fn(z)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.how == "regions":
            h = self._ck(lambda z: torch.tanh(self.b(z)), h)

        def region(z):
            z = torch.tanh(self.b(z))
            if self.how == "twice":
                z = self.b(torch.tanh(z))
            if self.how == "share":
                z = self.a(z[..., :3])
            return z

        return self._ck(region, h).pow(2).sum(1)


@pytest.mark.parametrize("how", ["last", "twice"])
def test_reentrant_region_at_the_end_is_one_pass(how):
    """The region's calls are recorded during the backward pass (its recomputation) and their
    gradients arrive in a nested backward pass: the tracker's pass ends with the outer one
    (it ended with the nested one: two passes, the region's per-example norms lost)."""
    torch.manual_seed(3)
    model = Tail(how).double()
    x = torch.randn(4, 3, dtype=DT)
    model.ck = False
    per = per_example_grads(model, lambda out, _: out.sum(), x, None)
    model.ck = True
    tracker = stats.track(model, per_example_norms=True)
    model(x).mean().backward()
    for p, g in zip(model.parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    expected = sum(g.pow(2).flatten(1).sum(1) for g in per)
    assert rel_err(tracker.per_example_sq_norms(), expected) < 1e-10
    tracker.detach()


@pytest.mark.parametrize("how", ["share", "regions"])
def test_reentrant_region_sharing_a_parameter_is_refused(how):
    """A parameter used inside a reentrant region and elsewhere: its gradients arrive before
    its other uses are recorded (squared apart: 20-70% off, or a misleading error)."""
    torch.manual_seed(4)
    model = Tail(how).double()
    x = torch.randn(4, 3, dtype=DT)
    tracker = stats.track(model)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model(x).mean().backward()
    tracker.detach()
