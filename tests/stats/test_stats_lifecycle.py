"""Accumulation over micro-batches, zeroing, detaching: ``grad_second_moment`` accumulates like
``p.grad`` and never outlives it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stats_brute import per_example_grads, rel_err, same_graph_grads
from torch import nn

import sgdlab.stats as stats
from sgdlab.stats import _deferred


def loss_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def setup(seed: int = 0, n: int = 12, kind: str = "mlp"):
    """A model whose layers take one kind of path: ``mlp`` the 2-D Linear lane, ``seq`` the
    short paths of Linear on ``[B, T, in]`` and LayerNorm, ``cnn`` the convolution's."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(n, 5)
    elif kind == "seq":
        model = nn.Sequential(
            nn.Linear(5, 6),
            nn.LayerNorm(6),
            nn.Tanh(),
            nn.Linear(6, 3),
            nn.Flatten(),
            nn.Linear(3 * 4, 3),
        )
        x = torch.randn(n, 4, 5)
    else:
        model = nn.Sequential(
            nn.Conv1d(5, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 3)
        )
        x = torch.randn(n, 5, 4)
    model, x = model.double(), x.double()
    y = torch.randint(0, 3, (n,))
    per = per_example_grads(model, loss_sum, x, y)
    return model, x, y, per


KINDS = ["mlp", "seq", "cnn"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norms", [True, False], ids=["general", "short"])
def test_micro_batches_with_total_batch_size_give_concatenated_batch(kind, norms):
    model, x, y, per = setup(kind=kind)
    tracker = stats.track(model, batch_size=12, per_example_norms=norms)
    for xs, ys in zip(x.split(4), y.split(4), strict=True):  # loss_j / k pattern
        (loss_sum(model(xs), ys) / 12).backward()
    for p, g in zip(model.parameters(), per, strict=True):
        assert rel_err(p.grad, g.mean(0)) < 1e-12
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    assert tracker.num_examples == 12
    if norms:
        sq = sum(g.pow(2).flatten(1).sum(1) for g in per)
        assert rel_err(tracker.per_example_sq_norms(), sq) < 1e-10


@pytest.mark.parametrize("defer", [True, False], ids=["at-end", "on-arrival"])
@pytest.mark.parametrize("kind", KINDS)
def test_micro_batches_without_batch_size_accumulate_like_grad(kind, defer, monkeypatch):
    """k mean-reduced micro-batches: p.grad = sum of k means and grad_second_moment = sum of k
    second moments, so dividing both by k gives the concatenated batch (short-path calls
    computed at the end of each pass, or as their gradients arrive)."""
    if not defer:
        monkeypatch.setattr(_deferred, "DEFER_BYTES", -1)
    model, x, y, per = setup(kind=kind)
    stats.track(model)
    for xs, ys in zip(x.split(4), y.split(4), strict=True):
        (loss_sum(model(xs), ys) / 4).backward()
    for p, g in zip(model.parameters(), per, strict=True):
        assert rel_err(p.grad / 3, g.mean(0)) < 1e-12
        assert rel_err(p.grad_second_moment / 3, (g * g).mean(0)) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_retain_graph_second_backward_adds_like_grad(kind):
    model, x, y, per = setup(kind=kind)
    stats.track(model)
    loss = loss_sum(model(x), y) / 12
    loss.backward(retain_graph=True)
    loss.backward()
    for p, g in zip(model.parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, 2 * (g * g).mean(0)) < 1e-10


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_starts_afresh(set_to_none):
    model, x, y, per = setup()
    stats.track(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    (loss_sum(model(x[:6]), y[:6]) / 6).backward()
    opt.zero_grad(set_to_none=set_to_none)
    (loss_sum(model(x), y) / 12).backward()
    for p, g in zip(model.parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10


def test_zero_and_detach():
    model, x, y, _ = setup()
    tracker = stats.track(model)
    (loss_sum(model(x), y) / 12).backward()
    tracker.zero()
    assert all(p.grad_second_moment is None for p in model.parameters())
    tracker.detach()
    assert not any(hasattr(p, "grad_second_moment") for p in model.parameters())
    (loss_sum(model(x), y) / 12).backward()
    assert not any(hasattr(p, "grad_second_moment") for p in model.parameters())


def test_context_manager_and_no_grad_forward():
    model, x, y, per = setup()
    with stats.track(model):
        with torch.no_grad():
            model(x)  # evaluation forward: not recorded, does not count as a second use
        (loss_sum(model(x), y) / 12).backward()
        for p, g in zip(model.parameters(), per, strict=True):
            assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    assert not any(hasattr(p, "grad_second_moment") for p in model.parameters())


def test_paused_block_is_not_recorded():
    model, x, y, per = setup()
    tracker = stats.track(model)
    with tracker.paused():
        penalty = model(x).pow(2).sum()
        torch.autograd.grad(penalty, list(model.parameters()))  # e.g. a gradient penalty
    (loss_sum(model(x), y) / 12).backward()
    for p, g in zip(model.parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10


def test_mixed_precision_autocast_accumulates_in_parameter_dtype():
    """Under bfloat16 autocast the statistics stay float32 and agree with the float32
    brute-force loop to bfloat16 accuracy."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)
    )
    x, y = torch.randn(8, 2, 6), torch.randint(0, 3, (8,))
    per = per_example_grads(model, loss_sum, x, y)
    stats.track(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_sum(model(x).float(), y) / 8
    loss.backward()
    for p, g in zip(model.parameters(), per, strict=True):
        assert p.grad_second_moment.dtype == torch.float32
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 0.1


def test_only_the_gradients_zeroed_in_place_restart():
    """Zeroing some gradients in place (and leaving the others to accumulate) restarts the
    statistics of those parameters only."""
    model, x, y, per = setup()
    stats.track(model)
    first, rest = (x[:6], y[:6]), (x[6:], y[6:])
    (loss_sum(model(*first[:1]), first[1]) / 6).backward()
    zeroed = [model[0].weight, model[2].bias]
    for p in zeroed:
        p.grad.zero_()
    (loss_sum(model(*rest[:1]), rest[1]) / 6).backward()
    for p, g in zip(model.parameters(), per, strict=True):
        second = (g[6:] * g[6:]).mean(0)
        expected = second if any(p is q for q in zeroed) else (g[:6] * g[:6]).mean(0) + second
        assert rel_err(p.grad_second_moment, expected) < 1e-10


def test_sparse_gradient_zeroed_in_place_restarts():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    model = model.double()
    stats.track(model)
    x = torch.randint(0, 10, (5, 3))
    model(x).sum().backward()
    once = [p.grad_second_moment.clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.0).zero_grad(set_to_none=False)
    assert model[0].weight.grad.layout == torch.sparse_coo
    model(x).sum().backward()  # the same batch again, from zeroed gradients: not doubled
    for p, m in zip(model.parameters(), once, strict=True):
        assert torch.equal(p.grad_second_moment, m)


def test_torch_func_transforms_are_not_recorded():
    """Per-example gradients computed by the user with torch.func on a tracked model (vmap of
    grad over functional_call) run, record nothing, and agree with the tracker's statistics of
    the ordinary backward pass that follows."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xb):
        return functional_call(model, p, (xb[None],)).square().sum()

    with stats.track(model):
        per = vmap(grad(loss), in_dims=(None, 0))(params, x)
        grad(lambda p: loss(p, x[0]))(params)
        assert all(getattr(p, "grad_second_moment", None) is None for p in model.parameters())
        model(x).square().sum(1).mean().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                p.grad_second_moment, per[name].pow(2).mean(0), rtol=1e-12, atol=1e-15
            )


KEYWORD_CALLS = [
    ("linear", lambda: nn.Linear(3, 2), lambda: torch.randn(5, 3), {}),
    ("linear-seq", lambda: nn.Linear(3, 2), lambda: torch.randn(5, 4, 3), {}),
    ("conv2d", lambda: nn.Conv2d(2, 3, 3), lambda: torch.randn(5, 2, 5, 5), {}),
    ("layernorm", lambda: nn.LayerNorm(3), lambda: torch.randn(5, 4, 3), {}),
    ("embedding", lambda: nn.Embedding(7, 2), lambda: torch.randint(0, 7, (5, 3)), {}),
    ("prelu", lambda: nn.PReLU(2), lambda: torch.randn(5, 2, 3), {}),
    ("grucell", lambda: nn.GRUCell(3, 2), lambda: torch.randn(5, 3), {}),
    (
        "conv-transpose-output-size",
        lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1),
        lambda: torch.randn(5, 2, 3, 3),
        {"output_size": [6, 6]},
    ),
]


@pytest.mark.parametrize("case", KEYWORD_CALLS, ids=[c[0] for c in KEYWORD_CALLS])
def test_inputs_passed_by_keyword(case):
    """``layer(input=x)`` gives the statistics of ``layer(x)``, bitwise (the rules read the input
    as the first positional argument; keyword inputs are moved there)."""
    _, make, make_x, extra = case
    torch.manual_seed(5)
    layer = make().double()
    x = make_x()
    x = x.double() if x.is_floating_point() else x
    got = []
    for keyword in (False, True):
        with stats.track(layer):
            layer.zero_grad(set_to_none=True)
            out = layer(input=x, **extra) if keyword else layer(x, **extra)
            out.square().sum().backward()
            got.append([p.grad_second_moment.clone() for p in layer.parameters()])
    for a, b in zip(*got, strict=True):
        assert torch.equal(a, b)


def test_bilinear_inputs_passed_by_keyword():
    torch.manual_seed(6)
    bil = nn.Bilinear(3, 2, 4).double()
    x1, x2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    got = []
    calls = (lambda: bil(x1, x2), lambda: bil(x1, input2=x2), lambda: bil(input1=x1, input2=x2))
    for call in calls:
        with stats.track(bil):
            bil.zero_grad(set_to_none=True)
            call().square().sum().backward()
            got.append([p.grad_second_moment.clone() for p in bil.parameters()])
    for other in got[1:]:
        for a, b in zip(got[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["mlp", "seq", "cnn", "lstm", "embedding"])
def test_an_empty_batch_gives_zero_statistics(kind):
    """A backward pass over zero examples (summed loss) leaves zero statistics and no per-example
    norms, like the zero gradient it leaves; the next pass is recorded as usual."""
    torch.manual_seed(7)
    model, shape = {
        "mlp": (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), (3,)),
        "seq": (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), (5, 3)),
        "cnn": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), (3, 6, 6)),
        "lstm": (nn.LSTM(3, 4, batch_first=True), (5, 3)),
        "embedding": (nn.Embedding(5, 3), None),
    }[kind]

    def batch(n):
        return torch.randint(0, 5, (n, 4)) if shape is None else torch.randn(n, *shape)

    def loss(out):
        return (out[0] if isinstance(out, tuple) else out).square().sum()

    with stats.track(model, per_example_norms=True, reduction="sum") as tracker:
        loss(model(batch(0))).backward()
        for p in model.parameters():
            assert torch.equal(p.grad_second_moment, torch.zeros_like(p))
        assert tracker.per_example_sq_norms().shape == (0,)
        assert tracker.num_examples == 0
        model.zero_grad(set_to_none=True)
        loss(model(batch(3))).backward()
        assert tracker.num_examples == 3
        assert all(p.grad_second_moment.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("kind", ["embedding", "bag"])
def test_a_table_used_twice_on_a_batch_without_lookups(kind):
    """A lookup table used twice in a pass whose examples look up nothing (sequences of length
    0, empty bags): zero statistics, as the zero gradient (the rows of both uses were
    reshaped with an inferred width and failed); a pass with lookups then gives the
    per-example loop's statistics."""
    torch.manual_seed(8)
    if kind == "embedding":
        table = nn.Embedding(5, 3).double()

        def run(n):
            idx = torch.randint(0, 5, (3, n))
            return table(idx).sum((1, 2)) + table(idx.flip(1)).pow(2).sum((1, 2))
    else:
        table = nn.EmbeddingBag(5, 3, mode="sum").double()

        def run(n):
            idx = torch.randint(0, 5, (3 * n,))
            offsets = torch.arange(3) * n
            return table(idx, offsets).sum(1) + table(idx, offsets).pow(2).sum(1)

    with stats.track(table, reduction="sum", per_example_norms=True) as tracker:
        run(0).sum().backward()
        assert torch.equal(table.weight.grad_second_moment, torch.zeros_like(table.weight))
        assert torch.equal(tracker.per_example_sq_norms(), torch.zeros(3, dtype=torch.float64))
        table.zero_grad(set_to_none=True)
        torch.manual_seed(9)
        run(2).sum().backward()
        got = table.weight.grad_second_moment.clone()
    torch.manual_seed(9)
    (g,) = same_graph_grads(run(2), [table.weight])
    assert rel_err(got, (g * g).mean(0)) < 1e-10


def test_a_second_tracker_on_a_tracked_module_is_refused():
    """Two trackers would both add their statistics to grad_second_moment (twice the moment
    once gradients accumulate): the second is refused until the first is detached; a model that
    cannot be tracked leaves no hooks behind."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    first = stats.track(model)
    with pytest.raises(ValueError, match=r"module '0' is already tracked by another Tracker"):
        stats.track(model)
    with pytest.raises(ValueError, match="already tracked"):
        stats.track(model[2])
    first.detach()
    second = stats.track(model)
    x = torch.randn(4, 3)
    for _ in range(2):  # accumulation: one tracker's statistics, added once per pass
        model(x).square().mean().backward()
    once = model[0].weight.grad_second_moment.clone()
    second.detach()
    with stats.track(model):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        torch.testing.assert_close(once, 2 * model[0].weight.grad_second_moment)
    bad = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))

    def refuse(*args, **kwargs):
        raise RuntimeError("no hooks here")

    bad[1].register_forward_hook = refuse  # attaching fails at the second module
    with pytest.raises(RuntimeError, match="no hooks here"):
        stats.track(bad)
    assert not bad[0]._forward_hooks
    with stats.track(bad[0]):  # not left attached by the failed attempt
        pass


@pytest.mark.parametrize("accumulate", [1, 2])
def test_grad_scaler_statistics_are_those_of_the_unscaled_loss(accumulate):
    """With ``scaler.scale(loss).backward()`` the gradients carry the loss scale until
    ``scaler.unscale_``; the statistics, which unscale_ cannot reach, are divided by the scale
    squared when the tracker is given the scaler: equal to those of the unscaled loss (norms
    too), and a per-example Adam step equals the step without scaling."""
    import sgdlab

    torch.manual_seed(8)
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def run(scaled: bool):
        torch.manual_seed(9)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        opt = sgdlab.Adam(model.parameters(), lr=1e-2, second_moment="per_example")
        with stats.track(
            model, grad_scaler=scaler, per_example_norms=True, batch_size=8
        ) as tracker:
            for part in torch.arange(8).chunk(accumulate):
                loss = ((model(x[part]) - y[part]) ** 2).sum() / 8
                scaler.scale(loss).backward()
            moments = [p.grad_second_moment.clone() for p in model.parameters()]
            norms = tracker.per_example_sq_norms()
            scaler.step(opt)
            scaler.update()
        return moments, norms, [p.detach().clone() for p in model.parameters()]

    plain, scaled = run(False), run(True)
    for a, b in zip(plain[0], scaled[0], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
    torch.testing.assert_close(scaled[1], plain[1], rtol=1e-5, atol=0)
    for a, b in zip(plain[2], scaled[2], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_grad_scaler_must_be_a_scaler():
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        stats.track(nn.Linear(2, 2), grad_scaler=1024.0)


@pytest.mark.parametrize("before_first_pass", [True, False])
def test_a_deep_copy_is_not_tracked_and_leaves_the_original_alone(before_first_pass):
    """copy.deepcopy of a tracked model (an EMA or teacher copy): the copy's passes record
    nothing, neither on the copy nor on the original (whose hooks it would otherwise share), and
    the copy can be tracked on its own; whole-module pickling names the remedy."""
    import copy
    import io

    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 1))
    x, x2 = torch.randn(5, 3), torch.randn(7, 3)
    tracker = stats.track(model)
    if not before_first_pass:
        model(x).square().mean().backward()
    copy_ = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    before = [p.grad_second_moment.clone() for p in model.parameters()]
    copy_(x2).square().mean().backward()  # another batch through the copy
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad_second_moment, b)
    assert all(getattr(p, "grad_second_moment", None) is None for p in copy_.parameters())
    with stats.track(copy_):
        copy_.zero_grad(set_to_none=True)
        copy_(x).square().mean().backward()
        for p, b in zip(copy_.parameters(), before, strict=True):
            torch.testing.assert_close(p.grad_second_moment, b)
    with pytest.raises(TypeError, match="cannot be pickled.*state_dict"):
        torch.save(model, io.BytesIO())
    tracker.detach()
    torch.save(model, io.BytesIO())


def test_a_shallow_copy_is_not_recorded_as_the_original():
    """copy.copy of a tracked layer shares its hooks; its calls are not recorded (they would be
    taken for the original's)."""
    import copy

    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    other = nn.Sequential(copy.copy(model[0]), nn.Tanh(), copy.copy(model[2]))
    x = torch.randn(5, 3)
    with stats.track(model):
        model(x).square().mean().backward()
        before = [p.grad_second_moment.clone() for p in model.parameters()]
        other(torch.randn(7, 3)).square().mean().backward()  # shares the parameters and hooks
        for p, b in zip(model.parameters(), before, strict=True):
            assert torch.equal(p.grad_second_moment, b)  # nothing added for the copy's pass


def test_a_parameter_shared_with_another_trackers_module_is_refused():
    """Two trackers on modules that share a weight (a head tied to an embedding) would each
    square their own use and both add to grad_second_moment (26-85% off): the second is
    refused, and the first keeps its statistics."""
    torch.manual_seed(12)
    emb, head = nn.Embedding(6, 4).double(), nn.Linear(4, 6, bias=False).double()
    head.weight = emb.weight
    first = stats.track(emb)
    idx = torch.randint(0, 6, (3, 2))
    head(emb(idx)).pow(2).sum().backward()
    kept = emb.weight.grad_second_moment.clone()
    with pytest.raises(ValueError, match="already tracked by another Tracker"):
        stats.track(head)
    assert torch.equal(emb.weight.grad_second_moment, kept)
    first.detach()
    both = nn.ModuleDict({"emb": emb, "head": head})
    with stats.track(both):  # one tracker over both: allowed
        pass


def test_calls_made_before_detach_write_nothing_after_it():
    """A forward pass inside ``with track(model)`` and its backward pass after the block: the
    hooks left on that pass's autograd nodes do nothing (they wrote a statistic that nothing
    updated later, which an optimizer with second_moment='per_example' then reused)."""
    import sgdlab

    torch.manual_seed(13)
    model = nn.Linear(3, 4).double()
    opt = sgdlab.Adam(model.parameters(), lr=1e-3, second_moment="per_example")
    x = torch.randn(5, 3, dtype=torch.float64)
    with stats.track(model):
        loss = model(x).pow(2).mean()
    loss.backward()
    assert not hasattr(model.weight, "grad_second_moment")
    with pytest.raises(ValueError, match="needs p.grad_second_moment"):
        opt.step()
