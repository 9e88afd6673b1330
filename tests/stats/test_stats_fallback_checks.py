"""The ``torch.func`` fallback checks what it cannot see: that each example's rerun gives the
batched call's output for that example, and that the module's forward pass left its buffers
alone. Modules that break either gave silently wrong statistics (or a module left holding
functorch's tensors); they now get a clear error. Exact cases (float64, per-example gradients
of the same batched graph) still pass, and MultiheadAttention's masks are recognised when
passed by keyword."""

from __future__ import annotations

import warnings

import pytest
import torch
from stats_brute import assert_statistics, same_graph_grads
from torch import nn

import sgdlab.stats as stats

B = 4


def _track(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning
        return stats.track(model, **kw)


class Centered(nn.Module):
    """Couples the examples: subtracts the batch mean (its rerun sees one example)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.tanh((x - x.mean(0)) * self.w)


class Mix(nn.Module):
    """Takes a ``[T, T]`` mixing matrix shared by the batch as an argument."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x, mix):
        return torch.tanh(mix @ (x * self.w))


class FeatureNoise(nn.Module):
    """Noise of one value per feature, shared by the batch (``[d]``)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x * self.w + torch.randn(x.shape[-1], dtype=x.dtype))


class SeqFirstNoise(nn.Module):
    """Noise drawn on a ``[T, B, d]`` tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = (x * self.w).transpose(0, 1)
        return torch.tanh(h + torch.randn_like(h)).transpose(0, 1)


def _refused(model, run, match="rerun of one example at a time"):
    tracker = _track(model)
    with pytest.raises(ValueError, match=match):
        run().pow(2).sum().backward()
    tracker.detach()


def test_a_module_coupling_the_examples_is_refused():
    torch.manual_seed(0)
    m = Centered().double()
    x = torch.randn(B, 3, dtype=torch.float64)
    _refused(m, lambda: m(x), "depends on other examples")


@pytest.mark.parametrize("T", [B, B + 1], ids=["T==B", "T!=B"])
def test_a_shared_argument_is_exact_or_refused(T):
    """A shared ``[T, T]`` argument is passed whole unless T equals the batch size, when it is
    split per example: that case is refused (it was 50% off)."""
    torch.manual_seed(1)
    m = Mix().double()
    x = torch.randn(B, T, 3, dtype=torch.float64)
    mix = torch.randn(T, T, dtype=torch.float64)
    if T == B:
        _refused(m, lambda: m(x, mix), "equal to the batch size")
        return
    per = same_graph_grads(m(x, mix).pow(2).sum((1, 2)), list(m.parameters()))
    tracker = _track(m, per_example_norms=True)
    (m(x, mix).pow(2).sum() / B).backward()
    assert_statistics(m, per, tracker)
    tracker.detach()


class DropConnect(nn.Module):
    """Dropout on the weight: one mask for the whole batch."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(rows, 3))

    def forward(self, x):
        return torch.tanh(x @ torch.nn.functional.dropout(self.w, 0.5).T)


@pytest.mark.parametrize("size", [B, 3], ids=["size==B", "size!=B"])
@pytest.mark.parametrize(
    "make",
    [FeatureNoise, DropConnect, lambda n: SeqFirstNoise()],
    ids=["feature-noise", "drop-connect", "noise-on-[T,B,d]"],
)
def test_draws_are_split_along_the_batch_wherever_it_is(make, size):
    """Each recorded draw or mask is split along the axis that holds the batch in the batched
    call and is 1 for one example; one of the same shape for both is shared by the batch.
    Before, only a first dimension equal to the batch size was split: noise per feature and
    a dropped-out weight with as many rows as the batch has examples were split (50-70% off),
    noise on a ``[T, B, d]`` tensor was applied whole to each example (15x off)."""
    torch.manual_seed(2)
    m = make(size).double()
    x = torch.randn(B, 5, size if make is FeatureNoise else 3, dtype=torch.float64)
    if make is DropConnect:
        x = x[:, 0]

    def run():
        torch.manual_seed(9)
        return m(x).pow(2).flatten(1).sum(1)

    per = same_graph_grads(run(), list(m.parameters()))
    tracker = _track(m, per_example_norms=True)
    (run().sum() / B).backward()
    assert_statistics(m, per, tracker)
    tracker.detach()


class Rebinds(nn.Module):
    """A running mean assigned anew in forward (``self.mu = ...``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))
        self.register_buffer("mu", torch.zeros(3))

    def forward(self, x):
        self.mu = 0.9 * self.mu + 0.1 * x.detach().mean(0)
        return torch.tanh((x - self.mu) * self.w)


class InPlace(Rebinds):
    """The same running mean updated in place."""

    def forward(self, x):
        with torch.no_grad():
            self.mu.mul_(0.9).add_(0.1 * x.mean(0))
        return torch.tanh((x - self.mu) * self.w)


@pytest.mark.parametrize("cls", [Rebinds, InPlace])
def test_a_forward_that_changes_buffers_is_refused_and_the_module_stays_usable(cls):
    """Before: the rerun put functorch's tensor into ``mu`` (the module was unusable after) or
    failed inside torch.func. Now the forward pass is refused with the buffer's name, after
    one update as without the tracker, and the module keeps working."""
    torch.manual_seed(4)
    m, twin = cls().double(), cls().double()
    twin.load_state_dict(m.state_dict())
    x = torch.randn(B, 3, dtype=torch.float64)
    tracker = _track(m)
    with pytest.raises(ValueError, match=r"changed its buffers \['mu'\]"):
        m(x)
    twin(x)
    assert torch.equal(m.mu, twin.mu)
    tracker.detach()
    assert torch.equal(m(x), twin(x))
    assert torch.equal(m.mu, twin.mu)


def test_a_buffer_read_but_not_changed_is_exact():
    torch.manual_seed(5)
    m = Rebinds().double()
    m.mu.normal_()
    m.forward = lambda x: torch.tanh((x - m.mu) * m.w)  # reads mu only
    x = torch.randn(B, 3, dtype=torch.float64)
    per = same_graph_grads(m(x).pow(2).sum(1), list(m.parameters()))
    tracker = _track(m)
    (m(x).pow(2).sum() / B).backward()
    assert_statistics(m, per)
    tracker.detach()


def test_eval_mode_noise_is_refused_with_a_message_about_random_draws():
    torch.manual_seed(6)
    m = FeatureNoise(3).double().eval()
    x = torch.randn(B, 3, dtype=torch.float64)
    _refused(m, lambda: m(x), "draws random numbers")


@pytest.mark.parametrize("mask", ["2-D", "3-D"])
def test_attention_fallback_finds_the_mask_passed_by_keyword(mask):
    """``add_bias_kv`` takes the fallback; with ``need_weights=`` among the keywords the mask
    arrived by position and was not recognised (a 2-D ``[L, S]`` mask with L == B was split
    per example, a 3-D one reached torch's shape error)."""
    torch.manual_seed(7)
    m = nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True).double()
    x = torch.randn(B, B, 4, dtype=torch.float64)  # L == B
    kpm = torch.zeros(B, B, dtype=torch.bool)
    kpm[1, 3] = True
    am = (
        torch.ones(B, B, dtype=torch.bool).triu(1)
        if mask == "2-D"
        else torch.randn(B * 2, B, B, dtype=torch.float64)
    )

    def run():
        return m(x, x, x, key_padding_mask=kpm, need_weights=True, attn_mask=am)[0]

    tracker = _track(m)
    if mask == "3-D":
        with pytest.raises(ValueError, match="3-D attn_mask"):
            run().pow(2).sum().backward()
        tracker.detach()
        return
    tracker.detach()
    per = same_graph_grads(run().pow(2).sum((1, 2)), list(m.parameters()))
    tracker = _track(m)
    (run().pow(2).sum() / B).backward()
    assert_statistics(m, per)
    tracker.detach()
