"""Layer grids: per-example second moments and norms of each ``torch.nn`` layer with parameters
over grids of its configurations, in the spirit of Opacus's grad-sample tests (the parameter
values they cover: batch size, channels, kernel sizes, strides, padding, dilation, groups,
bias, batch_first, ...).

Oracle: the brute-force per-example loop in float64 (``stats_brute.py``), rel. error <= 1e-10,
for ``p.grad_second_moment`` and ``tracker.per_example_sq_norms()``, with mean and sum loss
reductions; an empty batch gives zero statistics.

Sampling: each layer's grid is the full product of its value lists; where that product is
large, a fixed number of its points is drawn with ``random.Random(<layer name>)`` (the same
points on every run), so that the module runs in well under a minute on two cores. Inputs
that a layer cannot take batch first (``nn.Linear`` or a custom module on ``[T, B, ...]``) are
not in the grids: the tracker documents that the batch must come first there.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from stats_brute import per_example_grads, rel_err
from torch import nn

from sgdlab import stats

DT = torch.float64
# torch's notices (attention with kdim under the fallback's vmap; "same" padding's copy)
pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop", "ignore:Using padding='same'"
)
REDUCTIONS = ("mean", "sum")


def _grid(name: str, k: int | None, **values) -> list[dict]:
    """The product of ``values`` as keyword dicts; ``k`` of them drawn deterministically
    (``random.Random(name)``) when the product is larger."""
    keys = list(values)
    points = [dict(zip(keys, v, strict=True)) for v in itertools.product(*values.values())]
    if k is not None and len(points) > k:
        points = random.Random(name).sample(points, k)
    return points


def _ids(points: list[dict]) -> list[str]:
    return ["-".join(f"{k}={v}" for k, v in p.items()) for p in points]


class First(nn.Module):
    """The first output of a layer that returns a tuple (recurrent layers, attention)."""

    def __init__(self, layer: nn.Module, self_attention: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.self_attention = self_attention

    def forward(self, x):
        if self.self_attention:
            return self.layer(x, x, x)[0]
        return self.layer(x)[0]


class SequenceBias(nn.Module):
    """A learnt vector appended to each sequence (``[B, T, E]`` -> ``[B, T + 1, E]``), as
    Opacus's ``SequenceBias`` with ``batch_first=True``: a module without a rule (the
    fallback)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(embed_dim))

    def forward(self, x):
        return torch.cat([x, self.bias.expand(x.shape[0], 1, -1)], 1)


class Attention(nn.Module):
    """Self-attention, or attention on keys and values of other widths (``kdim``, ``vdim``)
    computed from the input by fixed maps."""

    def __init__(self, mha: nn.Module, kdim: int | None) -> None:
        super().__init__()
        self.mha = mha
        self.kdim = kdim

    def forward(self, x):
        if self.kdim is None:
            return self.mha(x, x, x, need_weights=False)[0]
        k = torch.cat([x, x[..., :1]], -1)[..., : self.kdim]
        return self.mha(x, k, k, need_weights=False)[0]


def _check(
    model: nn.Module, x: torch.Tensor, reduction: str, batch_dim: int = 0, **options
) -> None:
    """``model`` (float64) on the batch ``x``: tracked statistics against brute force
    (``options``: more arguments of :func:`sgdlab.stats.track`)."""
    model = model.to(DT)
    if x.is_floating_point():
        x = x.to(DT)

    def loss_fn(out, _):  # a sum of per-example losses, non-linear in the output
        return (out**2).sum() + out.sum()

    B = x.shape[batch_dim]
    params = [p for p in model.parameters() if p.requires_grad]
    if B:
        per = per_example_grads(model, loss_fn, x, None, batch_dim)
    else:
        per = [p.new_zeros((0, *p.shape)) for p in params]
    tracker = stats.track(
        model, reduction=reduction, per_example_norms=True, warn_fallback=False, **options
    )
    try:
        loss = loss_fn(model(x), None)
        (loss / max(B, 1) if reduction == "mean" else loss).backward()
        for (name, p), g in zip(model.named_parameters(), per, strict=True):
            want = g.pow(2).mean(0) if B else torch.zeros_like(p)
            got = p.grad_second_moment
            if B:
                assert rel_err(got, want) <= 1e-10, name
            else:
                assert torch.equal(got, want), name
        norms = sum(g.pow(2).flatten(1).sum(1) for g in per)
        got = tracker.per_example_sq_norms()
        if B:
            assert rel_err(got, norms) <= 1e-10
        else:
            assert got.shape == (0,)
    finally:
        tracker.detach()


# ------------------------------------------------------------------------------ linear
LINEAR = _grid("linear", 16, N=[0, 1, 3], input_dim=[2, 3, 4], bias=[True, False], W=[10, 17])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("cfg", LINEAR, ids=_ids(LINEAR))
def test_linear(cfg, reduction):
    torch.manual_seed(0)
    shape = [cfg["N"], 4, 3][: cfg["input_dim"] - 1] + [cfg["W"]]
    _check(nn.Linear(cfg["W"], 5, bias=cfg["bias"]), torch.randn(shape), reduction)


# ------------------------------------------------------------------------ convolutions
def _conv_grid(name: str, k: int, ndim: int) -> list[dict]:
    points = _grid(
        name,
        None,
        N=[0, 1, 3],
        C=[1, 3, 8],
        grow=[True, False],
        kernel=[2, 3],
        stride=[1, 2],
        padding=[0, 2, "same", "valid"],
        dilation=[1, 2],
        groups=[1, 2, 8],
        bias=[True, False],
    )
    ok = []
    for p in points:
        out = p["C"] * 2 if p["grow"] else max(1, p["C"] // 2)
        if p["C"] % p["groups"] or out % p["groups"]:
            continue
        if p["padding"] == "same" and p["stride"] != 1:
            continue  # refused by torch
        ok.append(p)
    return random.Random(name).sample(ok, k)


CONV = {
    1: _conv_grid("conv1d", 14, 1),
    2: _conv_grid("conv2d", 14, 2),
    3: _conv_grid("conv3d", 8, 3),
}
SIZES = {1: [9], 2: [11, 12], 3: [5, 6, 7]}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    ("ndim", "cfg"),
    [(d, p) for d in (1, 2, 3) for p in CONV[d]],
    ids=[f"conv{d}d-{i}" for d in (1, 2, 3) for i in _ids(CONV[d])],
)
def test_conv(ndim, cfg, reduction):
    torch.manual_seed(0)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
    out = cfg["C"] * 2 if cfg["grow"] else max(1, cfg["C"] // 2)
    layer = conv(
        cfg["C"],
        out,
        cfg["kernel"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        bias=cfg["bias"],
    )
    _check(layer, torch.randn([cfg["N"], cfg["C"], *SIZES[ndim]]), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("strategy", ["unfold", "grouped"])
def test_conv2d_per_axis_kernel_stride_padding_dilation(strategy, reduction):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 6, (2, 3), stride=(1, 2), padding=(2, 0), dilation=(3, 1), groups=3)
    _check(layer, torch.randn(3, 3, 13, 15), reduction, conv_strategy=strategy)


# --------------------------------------------------------------------- lookup tables
EMBEDDING = _grid(
    "embedding", 12, N=[0, 1, 3], T=[1, 5], V=[2, 32], D=[10, 17], dim=[2, 3], padding_idx=[None, 0]
)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("cfg", EMBEDDING, ids=_ids(EMBEDDING))
def test_embedding(cfg, reduction):
    torch.manual_seed(0)
    shape = [cfg["N"], cfg["T"], 2][: cfg["dim"]]
    layer = nn.Embedding(cfg["V"], cfg["D"], padding_idx=cfg["padding_idx"])
    _check(layer, torch.randint(0, cfg["V"], shape), reduction)


EMBEDDING_BAG = _grid(
    "embedding_bag", 10, N=[1, 4], sz=[3, 7], V=[10, 32], D=[10, 17], mode=["sum", "mean", "max"]
)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("cfg", EMBEDDING_BAG, ids=_ids(EMBEDDING_BAG))
def test_embedding_bag(cfg, reduction):
    torch.manual_seed(0)
    layer = nn.EmbeddingBag(cfg["V"], cfg["D"], mode=cfg["mode"])
    _check(layer, torch.randint(0, cfg["V"], (cfg["N"], cfg["sz"])), reduction)


# ---------------------------------------------------------------------- normalisation
GROUP_NORM = _grid("group_norm", None, N=[0, 1, 3], C=[4, 8], groups=[1, 4, "C"], affine=[True])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("cfg", GROUP_NORM, ids=_ids(GROUP_NORM))
def test_group_norm(cfg, reduction):
    torch.manual_seed(0)
    C = cfg["C"]
    groups = C if cfg["groups"] == "C" else cfg["groups"]
    layer = nn.GroupNorm(groups, C)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    _check(layer, torch.randn(cfg["N"], C, 5, 4), reduction)


def _norm_grid(name: str) -> list[dict]:
    points = _grid(
        name, None, N=[1, 3], input_dim=[2, 3, 4], norm_dim=[1, 2, 3], affine=[True, False]
    )
    points = [p for p in points if p["norm_dim"] < p["input_dim"]]
    return random.Random(name).sample(points, min(len(points), 10))


LAYER_NORM = _norm_grid("layer_norm")


def _normalized(cfg: dict) -> tuple[list[int], list[int]]:
    shape = [cfg["N"], 4, 3, 6][: cfg["input_dim"]]
    return shape, shape[len(shape) - cfg["norm_dim"] :]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("cfg", LAYER_NORM, ids=_ids(LAYER_NORM))
def test_layer_and_rms_norm(cfg, kind, reduction):
    torch.manual_seed(0)
    shape, normalized = _normalized(cfg)
    if kind == "layer_norm":
        layer = nn.LayerNorm(normalized, elementwise_affine=cfg["affine"])
    else:
        layer = nn.RMSNorm(normalized, elementwise_affine=cfg["affine"])
    for p in layer.parameters():
        nn.init.normal_(p)
    if not cfg["affine"]:  # no parameters: a Linear after it is tracked instead
        layer = nn.Sequential(layer, nn.Linear(shape[-1], 2))
    _check(layer, torch.randn(shape), reduction)


INSTANCE_NORM = _grid("instance_norm", None, ndim=[1, 2, 3], N=[1, 3], C=[1, 3])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("cfg", INSTANCE_NORM, ids=_ids(INSTANCE_NORM))
def test_instance_norm(cfg, reduction):
    torch.manual_seed(0)
    norm = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[cfg["ndim"] - 1]
    layer = norm(cfg["C"], affine=True)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    x = torch.randn([cfg["N"], cfg["C"], *[5, 4, 3][: cfg["ndim"]]])
    _check(layer, x, reduction)


# ------------------------------------------------------------------------- recurrent
RNN = _grid(
    "rnn",
    16,
    kind=["RNN", "GRU", "LSTM"],
    N=[1, 3],
    T=[1, 3],
    num_layers=[1, 2],
    bias=[True, False],
    batch_first=[True, False],
    bidirectional=[True, False],
)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("cfg", RNN, ids=_ids(RNN))
def test_recurrent(cfg, reduction):
    torch.manual_seed(0)
    layer = getattr(nn, cfg["kind"])(
        4,
        8,
        num_layers=cfg["num_layers"],
        bias=cfg["bias"],
        batch_first=cfg["batch_first"],
        bidirectional=cfg["bidirectional"],
    )
    bf = cfg["batch_first"]
    shape = [cfg["N"], cfg["T"], 4] if bf else [cfg["T"], cfg["N"], 4]
    _check(First(layer), torch.randn(shape), reduction, batch_dim=0 if bf else 1)


class DPRNN(nn.Module):
    """An Elman RNN stepped over time with ``nn.RNNCell`` (batch first), whose cell weights
    the module also registers under ``nn.RNN``'s names, as Opacus's DPRNN does."""

    def __init__(self, d_in: int, d_h: int, bias: bool) -> None:
        super().__init__()
        self.cell = nn.RNNCell(d_in, d_h, bias=bias)
        self.weight_ih_l0, self.weight_hh_l0 = self.cell.weight_ih, self.cell.weight_hh

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return h


DPRNN_GRID = _grid("dprnn", None, N=[1, 3], T=[1, 3], bias=[True, False])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("cfg", DPRNN_GRID, ids=_ids(DPRNN_GRID))
def test_dprnn_style(cfg, reduction):
    torch.manual_seed(0)
    _check(DPRNN(4, 8, cfg["bias"]), torch.randn(cfg["N"], cfg["T"], 4), reduction)


# ------------------------------------------------------------------------- attention
ATTENTION = _grid(
    "attention",
    16,
    N=[1, 3],
    T=[3, 5],
    heads=[1, 2],
    bias=[True, False],
    add_bias_kv=[True, False],
    add_zero_attn=[True, False],
    kdim=[None, 3],
    batch_first=[True, False],
)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("cfg", ATTENTION, ids=_ids(ATTENTION))
def test_multihead_attention(cfg, reduction):
    torch.manual_seed(0)
    kdim = cfg["kdim"]
    mha = nn.MultiheadAttention(
        4,
        cfg["heads"],
        bias=cfg["bias"],
        add_bias_kv=cfg["add_bias_kv"],
        add_zero_attn=cfg["add_zero_attn"],
        kdim=kdim,
        vdim=kdim,
        batch_first=cfg["batch_first"],
    )
    bf = cfg["batch_first"]
    shape = [cfg["N"], cfg["T"], 4] if bf else [cfg["T"], cfg["N"], 4]
    _check(Attention(mha, kdim), torch.randn(shape), reduction, batch_dim=0 if bf else 1)


SEQUENCE_BIAS = _grid("sequence_bias", None, N=[0, 1, 3], T=[10, 20], D=[4, 8])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("cfg", SEQUENCE_BIAS, ids=_ids(SEQUENCE_BIAS))
def test_sequence_bias(cfg, reduction):
    torch.manual_seed(0)
    _check(SequenceBias(cfg["D"]), torch.randn(cfg["N"], cfg["T"], cfg["D"]), reduction)
