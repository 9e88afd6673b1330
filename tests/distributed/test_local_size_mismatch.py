"""A rank whose micro-batches do not add up to its ``begin_step(local_size)``, on 2 and 4 gloo
processes: every rank raises the same ValueError before the step's gradients are exchanged
(without no_sync: before the last exchange) and applied, and the next, correct step of the same
DataParallel equals the single-process step on the concatenated batch. It used to raise on the
miscounting rank only, after the all-reduce, while the others stepped with mis-weighted
gradients. Jobs are forked with 60 s collective timeouts and a deadline, so a hang fails."""

from __future__ import annotations

import ddp_jobs
import pytest
import torch

from sgdlab.distributed import spawn


@pytest.mark.parametrize("world", [2, 4])
def test_a_miscounted_step_raises_on_every_rank_before_the_exchange(world, tmp_path):
    spawn(
        ddp_jobs.job_miscount,
        world,
        (str(tmp_path),),
        timeout=60.0,
        deadline=120.0,
        start_method="fork",
        threads=1,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for name, case in ddp_jobs.MISCOUNTS.items():
        errors = {ranks[r][name]["error"] for r in range(world)}
        assert len(errors) == 1, (name, errors)
        (error,) = errors
        bad = world - 1
        over = case["bad"][0] >= ddp_jobs.DECLARED  # found at the first micro-batch
        seen = (
            f"{case['bad'][0]} of 8 and 1 micro-batches to come"
            if over
            else (f"{sum(case['bad'])} of 8")
        )
        assert error is not None and f"rank {bad} differs" in error, (name, error)
        assert f"rank {bad}: {seen}" in error and "rank 0: " in error, (name, error)
        ref = ddp_jobs.one_correct_step(world, case["k"])
        for r in range(world):
            assert ranks[r][name]["untouched"], (name, r)
            for p, q in zip(ranks[r][name]["params"], ref, strict=True):
                assert float((p - q).abs().max()) <= 1e-12 * max(1.0, float(q.abs().max()))
            for p, q in zip(ranks[r][name]["params"], ranks[0][name]["params"], strict=True):
                assert torch.equal(p, q)
