"""DataParallel on 2 gloo processes (CPU, float64) against single-process oracles.

Oracles: a step on 2 ranks equals the single-process step on the concatenated batch
(parameters, optimizer state, per-example second moments, noise readings, batch size); ranks are
bit-identical; a killed run resumed from its checkpoint continues the uninterrupted trajectory
bit for bit on 2 ranks and to 1e-12 on 1 process; a failing or stalled rank ends the job with
its error within seconds. Jobs are forked (no re-import of torch) with 60 s collective timeouts
and a deadline, so a hang fails the test instead of blocking.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ddp_jobs
import pytest
import torch
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from sgdlab.distributed import DataParallel, spawn

DEADLINE = 90.0
EQUIVALENT = [
    "sgd-unequal",
    "rmsprop-per-example",
    "adam-accumulate-no-sync",
    "adam-accumulate-sync-unequal",
]


def _run(fn: Any, *args: Any, timeout: float = 60.0) -> None:
    spawn(fn, 2, args, timeout=timeout, deadline=DEADLINE, start_method="fork", threads=1)


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def _max_rel(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None)
        if y is not None:
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1.0)))
    return worst


def _state_tensors(state: list[dict[str, Any]]) -> list[torch.Tensor]:
    return [torch.as_tensor(v) for st in state for _, v in sorted(st.items())]


@pytest.fixture(scope="module")
def references() -> dict[str, Any]:
    # Computed before forking, so the ranks inherit the imported modules.
    return {name: ddp_jobs.reference(name) for name in ddp_jobs.CASES}


@pytest.fixture(scope="module")
def two_ranks(references: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("ddp")
    _run(ddp_jobs.job_equivalence, str(out))
    return _load(out / "rank0.pt"), _load(out / "rank1.pt")


@pytest.mark.parametrize("name", EQUIVALENT)
def test_step_equals_single_process_step_on_concatenated_batch(name, two_ranks, references):
    """Unequal local batches, momentum/weight decay, per-example RMSProp/Adam: parameters,
    optimizer state and second moments within 1e-12 of the single-process run."""
    got, ref = two_ranks[0][name], references[name]
    assert _max_rel(got["params"], ref["params"]) <= 1e-12
    assert _max_rel(got["moments"], ref["moments"]) <= 1e-12
    assert _max_rel(_state_tensors(got["state"]), _state_tensors(ref["state"])) <= 1e-12
    B = sum(ddp_jobs.CASES[name]["sizes"])
    assert got["batch_sizes"] == [B] * ddp_jobs.CASES[name]["steps"]
    assert got["opt_batch_size"] == ref["batch_sizes"][0] == B


@pytest.mark.parametrize(
    "name",
    [
        "rmsprop-per-example",
        "adam-accumulate-no-sync",
        "adam-accumulate-sync-unequal",
        "identical-50",
    ],
)
def test_noise_meter_is_global(name, two_ranks, references):
    """tr Sigma, |G|^2 and B_simple on 2 ranks equal the single-process meter on the whole
    batch, step by step."""
    got = torch.tensor(two_ranks[0][name]["readings"])
    ref = torch.tensor(references[name]["readings"])
    assert got.shape == ref.shape == (ddp_jobs.CASES[name]["steps"], 4)
    assert float(((got - ref).abs() / ref.abs().clamp_min(1.0)).max()) <= 1e-10
    assert torch.equal(got, torch.tensor(two_ranks[1][name]["readings"]))


@pytest.mark.parametrize("name", ["adam-accumulate-no-sync", "adam-accumulate-sync-unequal"])
def test_four_micro_batches_equal_one_large_batch(name, two_ranks, references):
    """4 micro-batches per rank (with DDP's no_sync, and with a gradient all-reduce in every
    micro-batch and unequal micro-batch sizes) equal one batch of all the examples."""
    assert ddp_jobs.CASES[name]["k"] == 4
    got, ref = two_ranks[0][name], references[name]
    assert _max_rel(got["params"], ref["params"]) <= 1e-12
    assert _max_rel(got["moments"], ref["moments"]) <= 1e-12


@pytest.mark.parametrize("name", list(ddp_jobs.CASES))
def test_ranks_stay_bit_identical(name, two_ranks):
    """Parameters and optimizer state equal bit for bit on both ranks after every step, and the
    final second moments too (rank 1 was initialised differently: DDP's broadcast and identical
    updates make them equal)."""
    a, b = two_ranks[0][name], two_ranks[1][name]
    assert len(a["trajectory"]) == ddp_jobs.CASES[name]["steps"]
    for x, y in zip(a["trajectory"], b["trajectory"], strict=True):  # after every step
        assert torch.equal(x, y)
    for x, y in zip(
        a["params"] + _state_tensors(a["state"]),
        b["params"] + _state_tensors(b["state"]),
        strict=True,
    ):
        assert torch.equal(x, y)
    for x, y in zip(a["moments"], b["moments"], strict=True):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("name", [n for n in ddp_jobs.CASES if n != "sgd-unequal"])
def test_second_moment_all_reduce_starts_inside_backward(name, two_ranks):
    """Every step's second-moment all-reduce was launched from the autograd callback that runs
    before DDP waits for its gradient buckets (the overlapped path), on both ranks."""
    for rank in (0, 1):
        assert two_ranks[rank][name]["overlapped"] == ddp_jobs.CASES[name]["steps"]


def test_rank_disagreement_is_a_clear_error_on_every_rank(two_ranks):
    for rank in (0, 1):
        errors = two_ranks[rank]["errors"]
        assert "accumulation_steps must be equal on every rank" in errors["accumulation"]
        assert "rank 0: 4 examples in 1 micro-batches" in errors["accumulation"]
        assert "rank 1: 4 examples in 2 micro-batches" in errors["accumulation"]
        assert "local batch sizes must be equal" in errors["equal_local"]


def test_killed_run_resumes_on_the_same_trajectory(two_ranks, tmp_path):
    """Rank 0 is SIGKILLed mid-step 7; the job stops. Resuming from the step-6 checkpoint
    (written once by rank 0) on 2 ranks gives the uninterrupted trajectory bit for bit, and on
    1 process (no process group) within 1e-12."""
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(ProcessExitedException, match="SIGKILL"):
        _run(ddp_jobs.job_killed, str(ckpt), str(tmp_path))
    saved = _load(ckpt)
    assert saved["steps"] == 6 and saved["world_size"] == 2 and saved["batch_size"] == 8
    assert not list(tmp_path.glob("*.tmp"))
    assert not (tmp_path / "resumed0.pt").exists()

    _run(ddp_jobs.job_resume, str(ckpt), str(tmp_path))
    uninterrupted = two_ranks[0]["resume"]
    for rank in (0, 1):
        resumed = _load(tmp_path / f"resumed{rank}.pt")
        for x, y in zip(
            resumed["params"] + _state_tensors(resumed["state"]),
            uninterrupted["params"] + _state_tensors(uninterrupted["state"]),
            strict=True,
        ):
            assert torch.equal(x, y)

    case = ddp_jobs.CASES["resume"]
    model = ddp_jobs.build_model(7)
    opt = ddp_jobs.build_optimizer(case, model)
    with DataParallel(model, opt, accumulation_steps=case["k"]) as dp:
        assert dp.world_size == 1 and dp.ddp is None
        dp.load(ckpt)
        while dp.steps < case["steps"]:
            x, y = ddp_jobs.local_batch(dp.steps, (8,), 0)
            dp.train_step(x, y, ddp_jobs.loss_fn)
    one = ddp_jobs.snapshot(model, opt)
    assert _max_rel(one["params"], uninterrupted["params"]) <= 1e-12
    assert _max_rel(_state_tensors(one["state"]), _state_tensors(uninterrupted["state"])) <= 1e-12


def test_a_rank_that_raises_brings_the_job_down_with_its_error():
    """Rank 1 gets inputs of the wrong width; rank 0 is already in the gradient all-reduce.
    The job ends with rank 1's error, not a hang."""
    start = time.monotonic()
    with pytest.raises(ProcessRaisedException, match="mat1 and mat2 shapes cannot be multiplied"):
        _run(ddp_jobs.job_bad_input)
    assert time.monotonic() - start < 30.0


def test_a_stalled_rank_fails_the_collective_after_the_timeout():
    """Rank 1 never joins the step's first collective: rank 0's times out (3 s) and the job
    ends with that error."""
    start = time.monotonic()
    with pytest.raises(ProcessRaisedException, match="(?i)timed out|timeout"):
        _run(ddp_jobs.job_stalled, timeout=3.0)
    assert time.monotonic() - start < 30.0
