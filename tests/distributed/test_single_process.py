"""DataParallel without a process group (one process), its bookkeeping and its errors.

Oracle: the same step code on one process with k micro-batches of any sizes equals one batch of
all the examples (parameters, second moments, optimizer state), float64.
"""

from __future__ import annotations

import ddp_jobs
import pytest
import torch
from torch import nn

import sgdlab
import sgdlab.stats
from sgdlab.distributed import DataParallel, GlobalBatch, SecondMomentReducer, gather_batch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def test_gather_batch_on_one_process():
    batch = gather_batch(12, accumulation_steps=3)
    assert batch == GlobalBatch(local_sizes=(12,), accumulation_steps=3, rank=0)
    assert (batch.size, batch.world_size, batch.local_size) == (12, 1, 12)
    assert batch.loss_scale(4) == pytest.approx(1 / 3)


def test_loss_scale_weights_ranks_by_examples():
    """Uniform DDP average of W n_r/B * (local mean) = example-weighted global mean."""
    batch = GlobalBatch(local_sizes=(5, 3), accumulation_steps=1, rank=1)
    assert batch.size == 8 and batch.local_size == 3
    means, sizes = torch.tensor([2.0, 7.0]), torch.tensor([5.0, 3.0])
    scales = torch.tensor([GlobalBatch((5, 3), 1, r).loss_scale(int(sizes[r])) for r in (0, 1)])
    assert float((scales * means).mean()) == pytest.approx(float((sizes * means).sum() / 8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(local_size=0), "local_size must be an integer >= 1, got 0"),
        (dict(local_size=3, accumulation_steps=4), "local_size must be >= accumulation_steps"),
        (dict(local_size=4, accumulation_steps=0), "accumulation_steps must be an integer"),
    ],
)
def test_gather_batch_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gather_batch(**kwargs)


@pytest.mark.parametrize("micro", [[16], [4, 4, 4, 4], [7, 1, 5, 3]])
@pytest.mark.parametrize("name", ["rmsprop-per-example", "adam-accumulate-sync-unequal"])
def test_micro_batches_equal_one_batch_on_one_process(name, micro):
    case = ddp_jobs.CASES[name]
    B = sum(micro)
    ref_model = ddp_jobs.build_model(0)
    ref_opt = ddp_jobs.build_optimizer(case, ref_model)
    with sgdlab.stats.track(ref_model):
        model = ddp_jobs.build_model(0)
        opt = ddp_jobs.build_optimizer(case, model)
        dp = DataParallel(model, opt, accumulation_steps=len(micro))
        for t in range(3):
            x, y = ddp_jobs.global_batch(t, B)
            ref_opt.zero_grad(set_to_none=True)
            ddp_jobs.loss_fn(ref_model(x), y).backward()
            ref_opt.step(batch_size=B)
            assert dp.begin_step(B).size == B
            for xb, yb in zip(x.split(micro), y.split(micro)):
                with dp.accumulate(len(xb)):
                    dp.backward(ddp_jobs.loss_fn(dp(xb), yb))
            dp.step()
            assert dp.num_examples == B and opt.param_groups[0]["batch_size"] == B
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert _rel(p, q) <= 1e-12
            assert _rel(p.grad_second_moment, q.grad_second_moment) <= 1e-12
            for k, v in ref_opt.state[q].items():
                assert _rel(torch.as_tensor(opt.state[p][k]), torch.as_tensor(v)) <= 1e-12
        dp.close()


def test_plain_torch_optimizer_and_no_tracker():
    """A torch optimizer without per-example statistics: no tracker, no reducer; the step is
    the plain SGD step on the batch mean."""
    model = ddp_jobs.build_model(0)
    ref = ddp_jobs.build_model(0)
    dp = DataParallel(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=2)
    assert dp.tracker is None and dp.reducer is None and dp.meter is None
    x, y = ddp_jobs.global_batch(0, 6)
    loss, reading = dp.train_step(x, y, ddp_jobs.loss_fn)
    assert reading is None
    ref_loss = ddp_jobs.loss_fn(ref(x), y)
    ref_loss.backward()
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-12)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            assert _rel(p, q - 0.1 * q.grad) <= 1e-12


def test_reducer_layout_and_missing_moments():
    a = nn.Parameter(torch.ones(2, 3, dtype=torch.float64))
    b = nn.Parameter(torch.ones(4, dtype=torch.float32))
    c = nn.Parameter(torch.ones(5, dtype=torch.float64))
    for p in (a, b, c):
        p.grad = torch.zeros_like(p)
    a.grad_second_moment = torch.full((2, 3), 2.0, dtype=torch.float64)
    b.grad_second_moment = torch.full((4,), 3.0)
    c.grad = None
    red = SecondMomentReducer([a, b, c])
    assert red.nbytes == 6 * 8 + 4 * 4 + 5 * 8
    red.launch(0.5)
    assert red.pending
    with pytest.raises(RuntimeError, match="not waited for"):
        red.launch()
    red.wait()
    assert torch.equal(a.grad_second_moment, torch.full((2, 3), 1.0, dtype=torch.float64))
    assert b.grad_second_moment.dtype == torch.float32
    assert torch.equal(b.grad_second_moment, torch.full((4,), 1.5))
    assert c.grad_second_moment is None
    with pytest.raises(ValueError, match="at least one parameter"):
        SecondMomentReducer([])


def _dp(**kw):
    model = ddp_jobs.build_model(0)
    opt = sgdlab.Adam(model.parameters(), lr=0.01, second_moment="per_example")
    return DataParallel(model, opt, **kw), model


def test_step_protocol_errors():
    dp, model = _dp(accumulation_steps=2)
    x, y = ddp_jobs.global_batch(0, 4)
    with pytest.raises(RuntimeError, match="call begin_step"):
        with dp.accumulate(2):
            pass
    with pytest.raises(RuntimeError, match="inside `with dp.accumulate"):
        dp.backward(ddp_jobs.loss_fn(dp(x), y))
    dp.begin_step(4)
    with pytest.raises(RuntimeError, match="begin_step called twice"):
        dp.begin_step(4)
    with pytest.raises(RuntimeError, match="must call dp.backward"):
        with dp.accumulate(2):
            dp(x[:2])
    with pytest.raises(ValueError, match="one-element tensor"):
        with dp.accumulate(2):
            dp.backward((dp(x[:2]) - y[:2]).pow(2))
    dp.begin_step(4)  # an error inside accumulate abandoned the step
    with pytest.raises(RuntimeError, match="already called"):
        with dp.accumulate(2):
            dp.backward(ddp_jobs.loss_fn(dp(x[:2]), y[:2]))
            dp.backward(ddp_jobs.loss_fn(dp(x[:2]), y[:2]))
    dp.begin_step(4)
    with dp.accumulate(2):
        dp.backward(ddp_jobs.loss_fn(dp(x[:2]), y[:2]))
    with pytest.raises(RuntimeError, match="1 of accumulation_steps=2"):
        dp.step()
    # the last micro-batch would bring 3 of the 4 declared examples: refused on entry, before
    # its backward pass (on every rank, before the exchange), and the step is abandoned
    with pytest.raises(ValueError, match=r"rank 0 differs \(rank 0: 3 of 4\)"):
        with dp.accumulate(1):
            raise AssertionError("not entered")
    dp.begin_step(4)
    for a in (0, 2):
        with dp.accumulate(2):
            dp.backward(ddp_jobs.loss_fn(dp(x[a : a + 2]), y[a : a + 2]))
    with pytest.raises(ValueError, match="more micro-batches than accumulation_steps=2"):
        with dp.accumulate(1):
            pass
    with pytest.raises(RuntimeError, match="middle of a step"):
        dp.load_state_dict(dp.state_dict())
    with pytest.raises(ValueError, match="same first dimension"):
        DataParallel(model, torch.optim.SGD(model.parameters(), lr=0.1)).train_step(
            x, y[:3], ddp_jobs.loss_fn
        )


def test_a_failed_micro_batch_abandons_the_step():
    """An exception inside accumulate closes the step; the next begin_step starts cleanly and
    the following step equals a fresh single-process step."""
    dp, model = _dp()
    ref, _ = _dp()
    x, y = ddp_jobs.global_batch(0, 4)
    dp.begin_step(4)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        with dp.accumulate(4):
            dp.backward(ddp_jobs.loss_fn(dp(x[:, :3]), y))
    dp.train_step(x, y, ddp_jobs.loss_fn)
    ref.train_step(x, y, ddp_jobs.loss_fn)
    for p, q in zip(model.parameters(), ref.module.parameters()):
        assert torch.equal(p, q)
    assert dp.steps == 1


def test_construction_errors():
    model = ddp_jobs.build_model(0)
    adam = sgdlab.Adam(model.parameters(), lr=0.01, second_moment="per_example")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        DataParallel("model", adam)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        DataParallel(model, "adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="accumulation_steps must be an integer >= 1, got 0"):
        DataParallel(model, adam, accumulation_steps=0)
    with pytest.raises(ValueError, match="reads per-example second moments"):
        DataParallel(model, adam, second_moments=False)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        DataParallel(model, adam, find_unused_parameters=True)
    with sgdlab.stats.track(model, per_example_norms=True) as tr:
        with pytest.raises(ValueError, match="per_example_norms=True are not supported"):
            DataParallel(model, adam, tracker=tr)
    with sgdlab.stats.track(model, reduction="sum") as tr:
        with pytest.raises(ValueError, match="reduction='mean'"):
            DataParallel(model, adam, tracker=tr)
    other = ddp_jobs.build_model(1)
    with sgdlab.stats.track(other) as tr:
        with pytest.raises(ValueError, match="attached to the model"):
            DataParallel(model, adam, tracker=tr)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        DataParallel(frozen, torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="beta must satisfy"):
        DataParallel(model, sgd, noise_meter={"beta": 1.5})
    with pytest.raises(ValueError, match="noise_meter needs second moments"):
        DataParallel(model, sgd, second_moments=False, noise_meter=True)


def test_checkpoint_round_trip_on_one_process(tmp_path):
    dp, model = _dp(noise_meter=True)
    x, y = ddp_jobs.global_batch(0, 6)
    _, reading = dp.train_step(x, y, ddp_jobs.loss_fn)
    assert reading is not None and reading.batch_size == 6
    path = dp.save(tmp_path / "sub" / "ck.pt")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    dp2, model2 = _dp()
    state = dp2.load(path)
    assert state["steps"] == dp2.steps == 1 and state["world_size"] == 1
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    # the meter travels with dp.save / dp.load: a resumed meter continues the smoothed values
    dp3, _ = _dp(noise_meter=True)
    dp3.load(path)
    assert dp3.meter.state_dict() == dp.meter.state_dict()
    x, y = ddp_jobs.global_batch(1, 6)
    r1 = dp.train_step(x, y, ddp_jobs.loss_fn)[1]
    r3 = dp3.train_step(x, y, ddp_jobs.loss_fn)[1]
    assert r3.b_simple_smoothed == r1.b_simple_smoothed
    with pytest.raises(ValueError, match="not a sgdlab.distributed checkpoint"):
        dp2.load_state_dict({"model": {}})
    with pytest.raises(ValueError, match="existing checkpoint file"):
        dp2.load(tmp_path / "missing.pt")
