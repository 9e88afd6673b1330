"""Rules registered for user layer types (``register_rule``) and the rule for Hugging Face's
``Conv1D``, against the brute-force per-example loop in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from stats_brute import assert_statistics, per_example_grads
from torch import nn

import sgdlab.stats as stats

B = 6


class Scale(nn.Module):
    """``y = x * s + t`` with one ``s`` and ``t`` per feature (last dimension)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.t = nn.Parameter(torch.linspace(-0.2, 0.2, n))

    def forward(self, x):
        return x * self.s + self.t


def scale_rule(module, inputs, grad_outputs):
    (x,), (d,) = inputs, grad_outputs
    return {
        "s": (x * d).reshape(x.shape[0], -1, x.shape[-1]).sum(1),
        "t": d.reshape(d.shape[0], -1, d.shape[-1]).sum(1),
    }


class Twice(nn.Module):
    """A Scale applied at every position of a sequence, then once more on the mean (its
    parameters used twice per example)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.scale = Scale(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.scale(self.inp(x)))
        return self.head(self.scale(h.mean(1)))


def _loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def _compare(model, x, y, reduction, **kw):
    per = per_example_grads(model, _loss, x, y)
    tracker = stats.track(model, reduction=reduction, per_example_norms=True, **kw)
    total = _loss(model(x), y)
    (total / B if reduction == "mean" else total).backward()
    assert_statistics(model, per, tracker)
    tracker.detach()


@pytest.mark.parametrize("budget", [None, 64], ids=["one-chunk", "chunks-of-one"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_registered_rule_matches_per_example_loop(reduction, budget):
    """Sequence inputs, a parameter used twice per example (per-example gradients summed over
    the uses before squaring), and chunks of one example under a tiny memory budget."""
    handle = stats.register_rule(Scale, scale_rule)
    try:
        torch.manual_seed(0)
        model = Twice().double()
        x, y = torch.randn(B, 5, 3, dtype=torch.float64), torch.randint(0, 2, (B,))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: the registered rule is used
            _compare(model, x, y, reduction, memory_budget=budget)
    finally:
        handle.remove()


def test_removing_the_rule_restores_the_fallback_and_subclasses_that_override_forward():
    handle = stats.register_rule(Scale, scale_rule)

    class Shifted(Scale):
        def forward(self, x):
            return super().forward(x) + 1.0

    class Same(Scale):
        pass

    with pytest.warns(UserWarning, match=r"1 \(Shifted\)"):
        tracker = stats.track(nn.Sequential(Same(3), Shifted(3)))
    assert tracker.fallback_modules == ("1 (Shifted)",)
    tracker.detach()
    handle.remove()
    handle.remove()  # removing twice is harmless
    with pytest.warns(UserWarning, match="fallback"):
        stats.track(Scale(3)).detach()


@pytest.mark.parametrize(
    "rule, match",
    [
        (lambda m, i, g: {"s": g[0]}, r"no per-example gradient for parameter 't'"),
        (lambda m, i, g: {"s": g[0], "t": g[0].sum(0)}, r"shape \(3,\) for parameter 't'"),
        (lambda m, i, g: [g[0]], "must return a mapping"),
        (lambda m, i, g: {"s": g[0], "t": g[0], "tt": g[0]}, r"\['tt'\], which are not"),
        (lambda m, i, g: {"s": g[0], "t": g[0].numpy()}, r"returned ndarray for parameter 't'"),
        (lambda m, i, g: {"s": g[0], "t": g[0].long()}, r"torch.int64 tensor for parameter"),
    ],
    ids=["missing", "shape", "not-a-mapping", "misspelt", "numpy", "integer"],
)
def test_a_faulty_rule_is_named_in_the_error(rule, match):
    handle = stats.register_rule(Scale, rule)
    try:
        model = Scale(3)
        stats.track(model)
        with pytest.raises((ValueError, TypeError), match=match):
            model(torch.randn(B, 3)).sum().backward()
    finally:
        handle.remove()


def test_register_rule_refuses_bad_arguments():
    with pytest.raises(TypeError, match="module_type must be a subclass of torch.nn.Module"):
        stats.register_rule(int, scale_rule)
    with pytest.raises(TypeError, match="per_example must be callable"):
        stats.register_rule(Scale, "scale_rule")


class Conv1D(nn.Module):
    """The affine map of Hugging Face's GPT-2 projections as ``transformers`` defines it
    (weight stored ``[nx, nf]``, ``y = x @ weight + bias`` through ``addmm``); the tracker
    recognises the class by name and module, so the test defines it under that module name
    (``transformers`` is not a test dependency)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.reshape(*x.shape[:-1], self.nf)


Conv1D.__module__ = "transformers.pytorch_utils"


class GPTStyle(nn.Module):
    """Conv1D on sequences (attention-like projections) and on pooled vectors, one called
    twice."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(8, 3)
        self.c_proj = Conv1D(4, 8)
        self.head = Conv1D(2, 4)

    def forward(self, x):
        h = torch.tanh(self.c_proj(torch.tanh(self.c_attn(x))))
        return self.head(h.mean(1)) + self.head(h[:, 0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hugging_face_conv1d_has_an_exact_rule(reduction):
    torch.manual_seed(1)
    model = GPTStyle().double()
    x, y = torch.randn(B, 5, 3, dtype=torch.float64), torch.randint(0, 2, (B,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        _compare(model, x, y, reduction)
    flat = nn.Sequential(Conv1D(4, 3), nn.Tanh(), Conv1D(2, 4)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compare(flat, torch.randn(B, 3, dtype=torch.float64), y, reduction)


def test_rule_handles_removed_in_any_order():
    """Two rules registered for one type, removed oldest first: none is left (removing the
    older handle did nothing while the newer was active, and the newer's removal then brought
    the older back)."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.g

    def rule_a(module, inputs, grads):
        return {"g": inputs[0] * grads[0]}

    def rule_b(module, inputs, grads):  # the same rule under another name
        return rule_a(module, inputs, grads)

    h1 = stats.register_rule(Odd, rule_a)
    h2 = stats.register_rule(Odd, rule_b)
    h1.remove()
    assert stats.rule_for(Odd()) is h2.rule
    h2.remove()
    assert stats.rule_for(Odd()).is_fallback
    h3 = stats.register_rule(Odd, rule_a)
    h4 = stats.register_rule(Odd, rule_b)
    h4.remove()
    assert stats.rule_for(Odd()) is h3.rule
    h3.remove()
    assert stats.rule_for(Odd()).is_fallback
