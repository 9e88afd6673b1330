"""Every layer rule against a brute-force per-example autograd loop (float64, rel. err 1e-10),
for mean- and sum-reduced losses, with awkward shapes."""

from __future__ import annotations

import warnings

import pytest
import torch
from stats_brute import per_example_grads, rel_err
from torch import nn

import sgdlab.stats as stats
from sgdlab.stats import _deferred, _pass

B = 5


def sq_loss(out, y):
    if isinstance(out, tuple):
        out = out[0]
    return 0.5 * ((out - y) ** 2).sum()


def lstm_loss(out, y):
    seq, (h, c) = out
    return 0.5 * ((seq - y) ** 2).sum() + (h**2).sum() + 0.3 * c.sum()


def rnn_loss(out, y):
    seq, h = out
    return 0.5 * ((seq - y) ** 2).sum() + (h**3).sum()


class Scale(nn.Module):
    """A module with direct parameters and no dedicated rule (takes the fallback)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n))
        self.c = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.tanh(x * self.w) + self.c * x.pow(2)


class SelfAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class SeqFirstAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d, 2)

    def forward(self, x):  # x: [B, T, d], attention runs sequence-first
        out, w = self.mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))
        return out.transpose(0, 1) + w.sum(-1, keepdim=True)


class MaskedAttention(nn.Module):
    """Cross-attention with separate key/value widths, a causal float mask, a boolean key
    padding mask (built from the input, so it is per example) and per-head weights in the
    loss."""

    def __init__(self, **kw) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True, kdim=3, vdim=5, **kw)

    def forward(self, x):  # x: [B, T, 12] = query 4 | key 3 | value 5
        q, k, v = x[..., :4], x[..., 4:7], x[..., 7:]
        t = x.shape[1]
        causal = torch.triu(torch.full((t, t), float("-inf"), dtype=x.dtype), 1)
        pad = x[..., 0] > 1.0  # per-example padding pattern
        pad[:, 0] = False
        out, w = self.mha(
            q, k, v, key_padding_mask=pad, attn_mask=causal, average_attn_weights=False
        )
        return out + w.sum((1, 3)).unsqueeze(-1) ** 2


class CrossAttention(nn.Module):
    """Queries from one half of the input, keys and values from the other (same width), and
    the returned weights in the loss: the three input projections act on different tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):  # x: [B, T, 8] = query 4 | key and value 4
        q, kv = x[..., :4], torch.tanh(x[..., 4:])
        out, w = self.mha(q, kv, kv)
        return out + w.sum(-1, keepdim=True) ** 2


class TwoInputs(nn.Module):
    """nn.Bilinear applied to (x, tanh x): a module with two batched inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(3, 3, 2)

    def forward(self, x):
        return self.bil(x, torch.tanh(x))


class TransposedToSize(nn.Module):
    """A transposed convolution called with ``output_size`` (the output padding it implies)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)

    def forward(self, x):
        return self.up(x, output_size=[6, 5])


class Dependent(nn.Module):
    """A fallback module with two outputs, one computed from the other (as torch's LSTMCell
    computes h from the c it returns)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n))

    def forward(self, x):
        c = x * self.w
        return torch.tanh(c), c


class StateGate(nn.Module):
    """A fallback module taking a tuple of batched tensors (a recurrent-style state) and a dict
    of them, whose shapes would broadcast against a single example's input."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n))

    def forward(self, x, state, extra):
        h, c = state
        return (x + h) * self.w * torch.tanh(c) + extra["bias"] * self.w**2


class WithState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = StateGate(4)

    def forward(self, x):
        return self.gate(x, (x.sin(), x.cos()), {"bias": x.exp()})


def pair_loss(out, y):
    h, c = out
    return 0.5 * ((h - y) ** 2).sum() + (c**3).sum()


class Bags(nn.Module):
    """An EmbeddingBag on a 1-D input with offsets: rows of ``x`` [B, L] are bags, entries < 0
    are left out (bags of different lengths; one empty bag in BAG_INPUT); optional per-sample
    weights from the entries."""

    def __init__(self, bag: nn.EmbeddingBag, weights: bool = False) -> None:
        super().__init__()
        self.bag, self.weights = bag, weights

    def forward(self, x):
        keep = x >= 0
        flat = x[keep]
        counts = keep.sum(1)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        if not self.bag.include_last_offset:
            offsets = offsets[:-1]
        psw = torch.cos(flat.to(torch.get_default_dtype()) + 0.5) if self.weights else None
        if psw is not None:
            psw = psw.to(self.bag.weight.dtype)
        return self.bag(flat, offsets, per_sample_weights=psw)


BAG_INPUT = torch.tensor(
    [[1, 0, 4, -1], [2, 2, -1, -1], [-1, -1, -1, -1], [0, 0, 0, 3], [6, 5, 6, 1]]
)


class CellLoop(nn.Module):
    """A recurrent cell stepped over ``x[:, t]`` by hand (the state starts as None); an LSTM
    cell's output is ``[h, c]``, so that both outputs carry gradient."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return torch.cat(state, 1) if isinstance(state, tuple) else state


class BilinearSeq(nn.Module):
    """nn.Bilinear without bias at several positions, on (x, x^2)."""

    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(3, 3, 2, bias=False)

    def forward(self, x):
        return self.bil(x, x * x)


class BoolMaskAttention(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 1, batch_first=True, **kw)

    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]


# (id, model factory, input factory, loss, batch dim)
CASES = [
    ("linear-2d", lambda: nn.Linear(4, 3), lambda: torch.randn(B, 4), sq_loss, 0),
    ("linear-nobias", lambda: nn.Linear(4, 3, bias=False), lambda: torch.randn(B, 4), sq_loss, 0),
    ("linear-seq", lambda: nn.Linear(4, 3), lambda: torch.randn(B, 6, 4), sq_loss, 0),
    ("linear-seq1", lambda: nn.Linear(4, 3), lambda: torch.randn(B, 1, 4), sq_loss, 0),
    ("linear-4d", lambda: nn.Linear(4, 3), lambda: torch.randn(B, 2, 3, 4), sq_loss, 0),
    (
        "conv1d-stride-dil-pad",
        lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2),
        lambda: torch.randn(B, 3, 11),
        sq_loss,
        0,
    ),
    (
        "conv2d-groups",
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, groups=2),
        lambda: torch.randn(B, 4, 7, 6),
        sq_loss,
        0,
    ),
    (
        "conv2d-depthwise-circular",
        lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3, padding_mode="circular"),
        lambda: torch.randn(B, 3, 5, 5),
        sq_loss,
        0,
    ),
    (
        "conv2d-same-dilated",
        lambda: nn.Conv2d(2, 3, 4, padding="same", dilation=2, bias=False),
        lambda: torch.randn(B, 2, 8, 7),
        sq_loss,
        0,
    ),
    (
        "conv3d-groups-stride",
        lambda: nn.Conv3d(4, 4, 2, stride=(1, 2, 1), groups=2, padding=(0, 1, 1)),
        lambda: torch.randn(B, 4, 3, 5, 4),
        sq_loss,
        0,
    ),
    (
        "embedding-padding-idx",
        lambda: nn.Embedding(7, 3, padding_idx=2),
        lambda: torch.tensor(
            [[2, 1, 1, 4], [0, 2, 2, 2], [6, 6, 6, 6], [3, 1, 0, 5], [2, 2, 2, 2]]
        ),
        sq_loss,
        0,
    ),
    ("embedding-seq1", lambda: nn.Embedding(4, 2), lambda: torch.randint(0, 4, (B, 1)), sq_loss, 0),
    ("layernorm-2d", lambda: nn.LayerNorm((3, 4)), lambda: torch.randn(B, 2, 3, 4), sq_loss, 0),
    ("layernorm-seq1", lambda: nn.LayerNorm(4), lambda: torch.randn(B, 1, 4), sq_loss, 0),
    ("groupnorm", lambda: nn.GroupNorm(2, 4), lambda: torch.randn(B, 4, 3, 2), sq_loss, 0),
    ("rmsnorm", lambda: nn.RMSNorm(4, eps=1e-6), lambda: torch.randn(B, 3, 4), sq_loss, 0),
    (
        "batchnorm-eval",
        lambda: _eval_bn(),
        lambda: torch.randn(B, 3, 4, 2),
        sq_loss,
        0,
    ),
    (
        "rnn-tanh-2layer-bidir",
        lambda: nn.RNN(3, 4, num_layers=2, bidirectional=True, batch_first=True),
        lambda: torch.randn(B, 5, 3),
        rnn_loss,
        0,
    ),
    (
        "rnn-relu-seqfirst-len1",
        lambda: nn.RNN(3, 4, nonlinearity="relu"),
        lambda: torch.randn(1, B, 3),
        rnn_loss,
        1,
    ),
    (
        "lstm-proj-bidir",
        lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, batch_first=True),
        lambda: torch.randn(B, 4, 3),
        lstm_loss,
        0,
    ),
    ("gru-seqfirst", lambda: nn.GRU(3, 4, num_layers=2), lambda: torch.randn(6, B, 3), rnn_loss, 1),
    (
        "rnncell-relu-one-step",
        lambda: CellLoop(nn.RNNCell(3, 4, nonlinearity="relu")),
        lambda: torch.randn(B, 1, 3),
        sq_loss,
        0,
    ),
    (
        "rnncell-tanh-loop",
        lambda: CellLoop(nn.RNNCell(3, 4)),
        lambda: torch.randn(B, 4, 3),
        sq_loss,
        0,
    ),
    (
        "lstmcell-one-step",
        lambda: CellLoop(nn.LSTMCell(3, 4)),
        lambda: torch.randn(B, 1, 3),
        sq_loss,
        0,
    ),
    (
        "lstmcell-loop",
        lambda: CellLoop(nn.LSTMCell(3, 4)),
        lambda: torch.randn(B, 3, 3),
        sq_loss,
        0,
    ),
    (
        "grucell-nobias-loop",
        lambda: CellLoop(nn.GRUCell(3, 4, bias=False)),
        lambda: torch.randn(B, 3, 3),
        sq_loss,
        0,
    ),
    ("fallback-custom", lambda: Scale(4), lambda: torch.randn(B, 3, 4), sq_loss, 0),
    ("fallback-nested-arguments", WithState, lambda: torch.randn(B, 4), sq_loss, 0),
    (
        "fallback-dependent-outputs",
        lambda: Dependent(4),
        lambda: torch.randn(B, 3, 4),
        pair_loss,
        0,
    ),
    (
        "transposed-conv1d-stride-dil-pad-outpad",
        lambda: nn.ConvTranspose1d(3, 4, 3, stride=3, padding=2, output_padding=1, dilation=2),
        lambda: torch.randn(B, 3, 6),
        sq_loss,
        0,
    ),
    (
        "transposed-conv2d-groups",
        lambda: nn.ConvTranspose2d(
            4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2, output_padding=(1, 0)
        ),
        lambda: torch.randn(B, 4, 4, 3),
        sq_loss,
        0,
    ),
    (
        "transposed-conv2d-nobias-len1",
        lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, bias=False),
        lambda: torch.randn(B, 2, 1, 1),
        sq_loss,
        0,
    ),
    (
        "transposed-conv3d-depthwise",
        lambda: nn.ConvTranspose3d(3, 3, 2, stride=(1, 2, 2), groups=3, padding=(0, 1, 0)),
        lambda: torch.randn(B, 3, 2, 3, 2),
        sq_loss,
        0,
    ),
    (
        "transposed-conv-output-size",
        lambda: TransposedToSize(),
        lambda: torch.randn(B, 2, 3, 3),
        sq_loss,
        0,
    ),
    (
        "embeddingbag-mean-2d",
        lambda: nn.EmbeddingBag(7, 3, mode="mean"),
        lambda: torch.tensor(
            [[1, 1, 4, 0], [2, 2, 2, 2], [6, 5, 6, 3], [0, 1, 2, 3], [4, 4, 1, 4]]
        ),
        sq_loss,
        0,
    ),
    (
        "embeddingbag-sum-padding-2d",
        lambda: nn.EmbeddingBag(7, 3, mode="sum", padding_idx=2),
        lambda: torch.tensor(
            [[1, 1, 4, 2], [2, 2, 2, 2], [6, 5, 6, 3], [0, 1, 2, 3], [4, 4, 1, 4]]
        ),
        sq_loss,
        0,
    ),
    (
        "embeddingbag-max-2d",
        lambda: nn.EmbeddingBag(7, 3, mode="max"),
        lambda: torch.tensor(
            [[1, 1, 4, 0], [2, 2, 2, 2], [6, 5, 6, 3], [0, 1, 2, 3], [4, 4, 1, 4]]
        ),
        sq_loss,
        0,
    ),
    (
        "embeddingbag-offsets-sum-weights",
        lambda: Bags(nn.EmbeddingBag(7, 3, mode="sum"), True),
        lambda: BAG_INPUT,
        sq_loss,
        0,
    ),
    (
        "embeddingbag-offsets-mean-padding",
        lambda: Bags(nn.EmbeddingBag(7, 3, mode="mean", padding_idx=0)),
        lambda: BAG_INPUT,
        sq_loss,
        0,
    ),
    (
        "embeddingbag-offsets-max-padding-last-offset",
        lambda: Bags(nn.EmbeddingBag(7, 3, mode="max", padding_idx=0, include_last_offset=True)),
        lambda: BAG_INPUT,
        sq_loss,
        0,
    ),
    ("prelu-channels", lambda: nn.PReLU(3), lambda: torch.randn(B, 3, 5, 2), sq_loss, 0),
    ("prelu-shared-1d", lambda: nn.PReLU(), lambda: torch.randn(B), sq_loss, 0),
    ("bilinear-positions", lambda: BilinearSeq(), lambda: torch.randn(B, 3, 3), sq_loss, 0),
    (
        "instancenorm1d",
        lambda: nn.InstanceNorm1d(3, affine=True),
        lambda: torch.randn(B, 3, 5),
        sq_loss,
        0,
    ),
    (
        "instancenorm2d-running-stats-training",
        lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        lambda: torch.randn(B, 3, 4, 2),
        sq_loss,
        0,
    ),
    (
        "instancenorm3d-running-stats-eval",
        lambda: _eval_in(),
        lambda: torch.randn(B, 2, 3, 2, 2),
        sq_loss,
        0,
    ),
    ("bilinear", TwoInputs, lambda: torch.randn(B, 3), sq_loss, 0),
    ("mha", lambda: SelfAttention(4), lambda: torch.randn(B, 3, 4), sq_loss, 0),
    ("mha-seqfirst", lambda: SeqFirstAttention(4), lambda: torch.randn(B, 3, 4), sq_loss, 0),
    ("mha-masks-kdim", lambda: MaskedAttention(), lambda: torch.randn(B, 4, 12), sq_loss, 0),
    ("mha-cross", lambda: CrossAttention(), lambda: torch.randn(B, 3, 8), sq_loss, 0),
    (
        "mha-bool-mask-nobias",
        lambda: BoolMaskAttention(bias=False),
        lambda: torch.randn(B, 3, 4),
        sq_loss,
        0,
    ),
    (
        "mha-bias-kv-fallback",
        lambda: BoolMaskAttention(add_bias_kv=True, add_zero_attn=True),
        lambda: torch.randn(B, 3, 4),
        sq_loss,
        0,
    ),
]


def _eval_bn() -> nn.Module:
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    return bn.eval()


def _eval_in() -> nn.Module:
    norm = nn.InstanceNorm3d(2, affine=True, track_running_stats=True)
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    return norm.eval()


def _target(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    return torch.randn_like(out)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule_matches_per_example_loop(case, reduction):
    name, make_model, make_x, loss, bdim = case
    torch.manual_seed(hash(name) % 1000)
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            model = make_model()
            x = make_x()
        finally:
            torch.set_default_dtype(torch.float32)
    y = _target(model, x)
    per = per_example_grads(model, loss, x, y, batch_dim=bdim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = stats.track(model, reduction=reduction, per_example_norms=True)
    n = x.shape[bdim]
    total = loss(model(x), y)
    (total / n if reduction == "mean" else total).backward()
    for p, g in zip(model.parameters(), per, strict=True):
        assert rel_err(p.grad, g.sum(0) / (n if reduction == "mean" else 1)) < 1e-10
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10, p.shape
    norms = sum(g.pow(2).flatten(1).sum(1) for g in per)
    assert rel_err(tracker.per_example_sq_norms(), norms) < 1e-10
    tracker.detach()
    assert not hasattr(model.parameters().__next__(), "grad_second_moment")


SHORT_CASES = [
    c for c in CASES if c[0].startswith(("linear", "conv", "layernorm", "groupnorm", "rmsnorm"))
]


@pytest.mark.parametrize("defer", [True, False], ids=["at-end", "on-arrival"])
@pytest.mark.parametrize("case", SHORT_CASES, ids=[c[0] for c in SHORT_CASES])
def test_short_paths_equal_the_general_rule_bitwise(case, defer, monkeypatch):
    """Linear, convolution and per-example normalisation calls take a short path (the 2-D
    Linear lane, ``linear_seq_moments``, ``conv_moments``, ``norm_moments``), computed at the
    end of the pass (small calls) or as their gradient arrives: no call reaches the general
    rule, and the moments are bitwise those of the general rule (which the same model takes
    with ``per_example_norms=True``) and match the brute-force loop."""
    if not defer:
        monkeypatch.setattr(_deferred, "DEFER_BYTES", -1)
    name, make_model, make_x, loss, _ = case
    torch.manual_seed(hash(name) % 1000)
    model = make_model().double()
    x = make_x().double()
    y = _target(model, x)
    per = per_example_grads(model, loss, x, y)
    twin = make_model().double()
    twin.load_state_dict(model.state_dict())
    general = []
    compute = _pass.Pass.compute
    monkeypatch.setattr(
        _pass.Pass, "compute", lambda self, *a: general.append(self.tracker) or compute(self, *a)
    )
    short, slow = stats.track(model), stats.track(twin, per_example_norms=True)
    for m in (model, twin):
        (loss(m(x), y) / x.shape[0]).backward()
    assert short not in general and slow in general
    for p, q, g in zip(model.parameters(), twin.parameters(), per, strict=True):
        assert torch.equal(p.grad_second_moment, q.grad_second_moment)
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    short.detach()
    slow.detach()


def test_position_wise_shortcut_would_be_wrong():
    """The rule sums over positions before squaring; squaring per position differs a lot on a
    convolution, so the test above can tell the two apart."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    y = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    per = per_example_grads(conv, sq_loss, x, y)
    exact = (per[0] ** 2).mean(0)
    xs = torch.nn.functional.unfold(x, 3, padding=1)  # [B, 18, 64]
    d = (conv(x) - y).detach().reshape(4, 3, 64)
    shortcut = torch.einsum("bol,bil->oi", d**2, xs**2).reshape(exact.shape) / 4
    assert rel_err(shortcut, exact) > 0.1


CONV_CASES = [c for c in CASES if c[0].startswith("conv")]


@pytest.mark.parametrize("strategy", ["unfold", "grouped"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_strategies_agree_with_per_example_loop(case, strategy):
    name, make_model, make_x, loss, _ = case
    torch.manual_seed(7)
    model, x = make_model().double(), make_x().double()
    y = _target(model, x)
    per = per_example_grads(model, loss, x, y)
    tracker = stats.track(model, conv_strategy=strategy, memory_budget=2000)  # several chunks
    (loss(model(x), y) / x.shape[0]).backward()
    for p, g in zip(model.parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    tracker.detach()


@pytest.mark.parametrize("budget", [None, 2000], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_conv_with_one_frozen_parameter(frozen, budget):
    """A convolution whose weight or bias is frozen: the other one's moment alone, on the
    short path (one chunk) and through the general rule (several chunks)."""
    torch.manual_seed(11)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    getattr(conv, frozen).requires_grad_(False)
    x = torch.randn(5, 4, 6, 5, dtype=torch.float64)
    y = _target(conv, x)
    (g,) = per_example_grads(conv, sq_loss, x, y)
    tracker = stats.track(conv, memory_budget=budget)
    (sq_loss(conv(x), y) / 5).backward()
    (p,) = [q for q in conv.parameters() if q.requires_grad]
    assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    assert not hasattr(getattr(conv, frozen), "grad_second_moment")
    tracker.detach()


@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize(
    "make", [lambda: nn.LayerNorm(4), lambda: nn.GroupNorm(2, 4)], ids=["layernorm", "groupnorm"]
)
def test_norm_with_one_frozen_parameter(make, frozen):
    torch.manual_seed(12)
    norm = make().double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    getattr(norm, frozen).requires_grad_(False)
    x = torch.randn(5, 4, 3, 4, dtype=torch.float64)
    y = _target(norm, x)
    (g,) = per_example_grads(norm, sq_loss, x, y)
    tracker = stats.track(norm)
    (sq_loss(norm(x), y) / 5).backward()
    (p,) = [q for q in norm.parameters() if q.requires_grad]
    assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    assert not hasattr(getattr(norm, frozen), "grad_second_moment")
    tracker.detach()


def test_position_wise_shortcut_fails_on_correlated_sequences():
    """A linear map over a sequence whose positions repeat one vector: the exact per-example
    gradient is T d a^T, squared T^2 (d a)^2; squaring per position gives T (d a)^2, 99% low
    for T = 100. The tracker's value matches the brute-force loop."""
    torch.manual_seed(3)
    T = 100
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 1, 3, dtype=torch.float64).expand(4, T, 3).contiguous()
    y = torch.randn(4, 1, 2, dtype=torch.float64).expand(4, T, 2).contiguous()
    per = per_example_grads(lin, sq_loss, x, y)
    exact = (per[0] ** 2).mean(0)
    d = (lin(x) - y).detach()
    shortcut = torch.einsum("bto,bti->oi", d**2, x**2) / 4
    assert rel_err(shortcut, exact) > 0.98
    tracker = stats.track(lin)
    (sq_loss(lin(x), y) / 4).backward()
    assert rel_err(lin.weight.grad_second_moment, exact) < 1e-10
    tracker.detach()


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def _odd_unit_strides(x):
    """The same values with odd strides on a dim of size 1 (torch still calls it contiguous)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2) if x.shape[2] == 1 else x


LAYOUT_CASES = [
    (
        "channels-last, groups, padding",
        lambda: nn.Conv2d(4, 2, 1, padding=1, groups=2),
        lambda: torch.randn(3, 4, 5, 5),
        _channels_last,
    ),
    (
        "channels-last, 3x3, stride 2",
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        lambda: torch.randn(3, 4, 7, 6),
        _channels_last,
    ),
    (
        "length 1 from a transpose",
        lambda: nn.Conv1d(2, 2, 3, padding=2),
        lambda: torch.randn(4, 1, 2).transpose(1, 2),
        lambda x: x,
    ),
    (
        "1x1 spatial, odd strides",
        lambda: nn.Conv2d(3, 4, 3, padding=1, groups=1),
        lambda: torch.randn(5, 3, 1, 1),
        _odd_unit_strides,
    ),
]


@pytest.mark.parametrize("budget", [None, 200], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("strategy", ["unfold", "grouped"])
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_conv_inputs_in_other_memory_layouts(case, strategy, budget):
    """Channels-last inputs and inputs whose size-1 dims carry odd strides (made by a
    transpose): the im2col rows and the grouped weight-gradient convolution took their
    strides as given and failed in a view or in a CPU kernel that needs standard strides."""
    _, make_model, make_x, layout = case
    torch.manual_seed(5)
    conv = make_model().double()
    x = layout(make_x().double())
    y = _target(conv, x)
    per = per_example_grads(conv, sq_loss, x, y)
    tracker = stats.track(conv, conv_strategy=strategy, memory_budget=budget)
    (sq_loss(conv(x), y) / x.shape[0]).backward()
    for p, g in zip(conv.parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    tracker.detach()
