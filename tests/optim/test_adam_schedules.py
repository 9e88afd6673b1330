"""Adam under schedulers that move the betas (OneCycleLR, CyclicLR with cycle_momentum) is
torch.optim.Adam's, on every path: debiasing by ``1 - beta^t`` with the betas now in force.

The running product ``1 - prod beta_t`` (kept for batch-size changes, whose data mass it
measures exactly) ended 3.9e-3 (CyclicLR) and 1.1e-2 (OneCycleLR) off torch.
"""

from __future__ import annotations

import pytest
import torch

import sgdlab

from .cases import make_params, param_groups, set_grads

PATHS = [dict(foreach=False), dict(foreach=True), dict(fused=True), dict(capturable=True)]
PATH_IDS = ["reference", "foreach", "fused", "capturable"]
STEPS = 40


def one_cycle(opt):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS)


def cyclic(opt):
    return torch.optim.lr_scheduler.CyclicLR(
        opt,
        base_lr=0.001,
        max_lr=0.05,
        step_size_up=7,
        cycle_momentum=True,
        base_momentum=0.6,
        max_momentum=0.95,
    )


def by_hand(opt):
    class Edit:
        t = 0

        def step(self):
            self.t += 1
            for group in opt.param_groups:
                group["betas"] = ((0.5, 0.9, 0.0, 0.8)[self.t % 4], (0.99, 0.9)[self.t % 2])

    return Edit()


SCHEDULES = [one_cycle, cyclic, by_hand]


def run(cls, params, schedule, **kwargs):
    opt = cls(param_groups(params, sgdlab.Adam), lr=0.01, betas=(0.9, 0.99), **kwargs)
    sched = schedule(opt)
    for t in range(STEPS):
        set_grads(params, t)
        opt.step()
        sched.step()
    return opt


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=[s.__name__ for s in SCHEDULES])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_adam_under_beta_schedules_matches_torch(schedule, path, amsgrad):
    ours_p, theirs_p = make_params(4), make_params(4)
    run(sgdlab.Adam, ours_p, schedule, amsgrad=amsgrad, **path)
    run(torch.optim.Adam, theirs_p, schedule, amsgrad=amsgrad, foreach=False)
    for a, b in zip(ours_p, theirs_p, strict=True):
        assert (a - b).abs().max().item() <= 1e-12
    assert max((a - b).abs().max().item() for a, b in zip(ours_p, make_params(4))) > 1e-2


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_scheduled_betas_at_a_scaled_batch_size_match_torch_with_the_scaled_values(path):
    """With B != B0 fixed, the betas a scheduler sets are moved by the rule, and the step is
    torch.optim.Adam's with the effective lr/betas/eps of each step (read from
    ``effective_hyperparameters``): debiasing by ``1 - beta_eff^t``."""
    ours_p, theirs_p = make_params(5), make_params(5)
    ours = sgdlab.Adam(ours_p, lr=0.01, betas=(0.9, 0.99), ref_batch_size=8, batch_size=32, **path)
    theirs = torch.optim.Adam(theirs_p, lr=0.01, foreach=False)
    sched = one_cycle(ours)
    for t in range(STEPS):
        hp = ours.effective_hyperparameters(ours.param_groups[0])
        theirs.param_groups[0].update(lr=hp["lr"], betas=hp["betas"], eps=hp["eps"])
        set_grads(ours_p, t)
        set_grads(theirs_p, t)
        ours.step()
        theirs.step()
        sched.step()
    assert hp["betas"][0] != 0.9  # the rule moved the scheduled betas
    for a, b in zip(ours_p, theirs_p, strict=True):
        assert (a - b).abs().max().item() <= 1e-12


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_a_batch_size_change_keeps_the_running_product(path):
    """A change of betas that only a change of batch size makes is not a scheduler's: the
    debiasing keeps the product of the betas in force at each step (state ``beta1_prod``)."""
    params = make_params(6)
    opt = sgdlab.Adam(params, lr=0.01, betas=(0.9, 0.99), ref_batch_size=8, **path)
    used = []
    for t, b in enumerate([8, 8, 32, 32, 16, 8]):
        set_grads(params, t)
        opt.step(batch_size=b)
        used.append(opt.effective_hyperparameters(opt.param_groups[0])["betas"])
    state = opt.state_dict()["state"][0]
    for j in (0, 1):
        prod = 1.0
        for betas in used:
            prod *= betas[j]
        assert state[f"beta{j + 1}_prod"] == pytest.approx(prod, rel=1e-14, abs=0)
