"""Checkpoints that carry the noise meter (``save_checkpoint`` / ``load_checkpoint`` with
``noise_meter=``).

Oracles: a 2-rank run (gloo, float64) saves model, optimizer and meter after 3 steps and goes on
to step 6; one process that loads the checkpoint and runs steps 4-6 on the concatenated batches
gives the same smoothed noise readings (to rounding: another summation order) and parameters;
without the meter's state its smoothed readings restart and differ. On one process the resumed
meter is bit-identical to the uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ddp_jobs
import pytest
import torch

from sgdlab.distributed import DataParallel, load_checkpoint, save_checkpoint, spawn

CASE = ddp_jobs.CASES["rmsprop-per-example"]  # per-example RMSProp with the meter
SAVE, STEPS = 3, 6


def _dp(seed: int = 0) -> DataParallel:
    model = ddp_jobs.build_model(seed)
    return DataParallel(model, ddp_jobs.build_optimizer(CASE, model), noise_meter=True)


def _train(
    dp: DataParallel, sizes: tuple[int, ...], rank: int, until: int, ckpt: Path | None = None
) -> list[list[float]]:
    readings = []
    while dp.steps < until:
        x, y = ddp_jobs.local_batch(dp.steps, sizes, rank)
        _, r = dp.train_step(x, y, ddp_jobs.loss_fn)
        readings.append(ddp_jobs.reading_numbers(r))
        if ckpt is not None and dp.steps == SAVE:
            save_checkpoint(dp.state_dict, ckpt, noise_meter=dp.meter)
    return readings


def job_save_and_continue(rank: int, world: int, out: str) -> None:
    dp = _dp(seed=rank)
    readings = _train(dp, CASE["sizes"], rank, STEPS, Path(out) / "ck.pt")
    if rank == 0:
        params = [p.detach().clone() for p in dp.module.parameters()]
        torch.save({"readings": readings, "params": params}, Path(out) / "two.pt")
    dp.close()


def _resume(ckpt: Path, with_meter: bool) -> tuple[list[list[float]], list[torch.Tensor]]:
    dp = _dp(seed=7)  # starts elsewhere: the checkpoint must supply everything
    state = load_checkpoint(ckpt, noise_meter=dp.meter if with_meter else None)
    dp.load_state_dict(state)
    readings = _train(dp, (sum(CASE["sizes"]),), 0, STEPS)
    params = [p.detach().clone() for p in dp.module.parameters()]
    dp.close()
    return readings, params


def test_two_rank_checkpoint_with_meter_resumes_on_one_process(tmp_path: Path) -> None:
    spawn(
        job_save_and_continue,
        2,
        (str(tmp_path),),
        timeout=60.0,
        deadline=90.0,
        start_method="fork",
        threads=1,
    )
    two: dict[str, Any] = torch.load(tmp_path / "two.pt", weights_only=True)
    state = load_checkpoint(tmp_path / "ck.pt")
    assert state["noise_meter"]["updates"] == SAVE and state["steps"] == SAVE
    readings, params = _resume(tmp_path / "ck.pt", with_meter=True)
    flat = [v for r in readings for v in r]
    assert flat == pytest.approx([v for r in two["readings"][SAVE:] for v in r], rel=1e-10)
    for p, q in zip(params, two["params"], strict=True):
        assert float((p - q).abs().max()) <= 1e-12
    restarted, _ = _resume(tmp_path / "ck.pt", with_meter=False)
    smoothed = [r[3] for r in restarted]  # b_simple_smoothed restarts without the state
    assert smoothed[0] == pytest.approx(restarted[0][2], rel=1e-12)
    assert abs(smoothed[0] - two["readings"][SAVE][3]) > 1e-3 * abs(two["readings"][SAVE][3])


def test_one_process_resume_is_bit_identical(tmp_path: Path) -> None:
    sizes = (sum(CASE["sizes"]),)
    whole = _train(_dp(), sizes, 0, STEPS)
    dp = _dp()
    _train(dp, sizes, 0, SAVE, tmp_path / "ck.pt")
    dp.close()
    readings, _ = _resume(tmp_path / "ck.pt", with_meter=True)
    assert readings == whole[SAVE:]


def test_meter_checkpoint_errors(tmp_path: Path) -> None:
    dp = _dp()
    path = save_checkpoint(dp.state_dict, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="holds no noise-meter state"):
        load_checkpoint(path, noise_meter=dp.meter)
    with pytest.raises(TypeError, match="noise_meter must be a sgdlab.stats.NoiseMeter"):
        save_checkpoint(dp.state_dict, tmp_path / "x.pt", noise_meter=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already has a 'noise_meter' entry"):
        save_checkpoint({"noise_meter": 1}, tmp_path / "y.pt", noise_meter=dp.meter)
    assert not (tmp_path / "y.pt").exists()
    dp.close()
