"""Schedules against closed forms, torch's own schedulers, and a real torch optimizer."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as L

from sgdlab import schedules as S
from sgdlab.schedules import (
    BatchSizeRamp,
    Cosine,
    CyclicCosine,
    RobbinsMonro,
    Schedule,
    StepDrops,
    Warmup,
    attach,
)

F64 = torch.float64

# One table of schedules under test feeding the generic contract tests.
SCHEDULES = {
    "robbins_monro": lambda: RobbinsMonro(0.4, tau=5.0, gamma=0.75),
    "constant": lambda: RobbinsMonro.constant(0.05),
    "power_law": lambda: RobbinsMonro.power_law(0.3, 1.5),
    "step_drops": lambda: StepDrops(0.1, [7, 19, 30]),
    "cosine": lambda: Cosine(0.2, total_steps=25, eta_min=0.002),
    "cyclic_cosine": lambda: CyclicCosine(0.2, cycle_steps=6, cycle_mult=2, eta_min=0.01),
    "warmup": lambda: Warmup(StepDrops(0.8, [20, 30], factor=5.0), steps=8, start_factor=0.125),
    "warmup_shift": lambda: Warmup(Cosine(0.3, 30), steps=5, shift=True),
    "batch_ramp": lambda: BatchSizeRamp(0.1, 32, [10, 20, 30], factor=4, max_batch_size=1024),
}


def _params(n_groups: int) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3, dtype=F64)) for _ in range(n_groups)]


def _observed_lrs(opt, sched, params, steps: int) -> np.ndarray:
    """The lr each optimizer step actually applied, read off the parameter update.

    The parameters are zeroed and given a unit gradient before each step, so the update of a
    plain SGD step is exactly ``-lr`` in float64.
    """
    out = []
    for _ in range(steps):
        for p in params:
            with torch.no_grad():
                p.zero_()
            p.grad = torch.ones_like(p)
        opt.step()
        out.append([-p[0].item() for p in params])
        if sched is not None:
            sched.step()
    return np.array(out)


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", SCHEDULES)
def test_contract_values_sums_and_validation(name):
    s = SCHEDULES[name]()
    assert isinstance(s, Schedule) and s.base > 0
    T = 70
    vals = s.values(T)
    assert vals.dtype == np.float64 and vals.shape == (T,)
    np.testing.assert_allclose(vals, [s(t) for t in range(T)], rtol=1e-15, atol=0)
    assert all(isinstance(s(t), float) and s(t) >= 0 for t in range(T))
    assert s(np.int64(3)) == s(3)
    for power in (1.0, 2.0):
        exact = math.fsum(v**power for v in vals)
        assert s.partial_sum(T, power) == pytest.approx(exact, rel=1e-14)
        assert Schedule.partial_sum(s, T, power) == pytest.approx(exact, rel=1e-14)
    times = s.times(T)
    assert times[0] == 0.0 and times[-1] == pytest.approx(s.partial_sum(T), rel=1e-13)
    # the shape is a method on every schedule (StepDrops' factor attribute once shadowed it)
    np.testing.assert_allclose([s.shape(t) for t in range(T)], vals / s.base, rtol=1e-15)
    for bad in (-1, 1.5, True, "3", None):
        with pytest.raises(ValueError, match=r"t must be an integer step >= 0, got"):
            s(bad)


@pytest.mark.parametrize("name", SCHEDULES)
def test_attached_torch_sgd_applies_schedule_shape_to_each_group(name):
    """After k scheduler steps, group lr = schedule(k) * initial_lr / base, in every group."""
    s = SCHEDULES[name]()
    params = _params(3)
    group_lrs = [s.base, s.base / 4, 3 * s.base]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, group_lrs)])
    sched = attach(opt, s)
    T = 60
    seen = _observed_lrs(opt, sched, params, T)
    expected = np.outer(s.values(T) / s.base, group_lrs)
    np.testing.assert_allclose(seen, expected, rtol=1e-14, atol=0)
    np.testing.assert_allclose(seen[:, 0], s.values(T), rtol=1e-14)  # group at base: exact
    assert sched.get_last_lr() == pytest.approx(list(s(T) / s.base * np.array(group_lrs)))


@pytest.mark.parametrize("name", ["robbins_monro", "step_drops", "cosine", "warmup"])
def test_scheduler_state_dict_resumes(name):
    s = SCHEDULES[name]()
    params = _params(1)
    opt = torch.optim.SGD(params, lr=s.base)
    sched = attach(opt, s)
    _observed_lrs(opt, sched, params, 13)
    state, opt_state = sched.state_dict(), opt.state_dict()
    params2 = _params(1)
    opt2 = torch.optim.SGD(params2, lr=s.base)
    sched2 = attach(opt2, s)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    seen = _observed_lrs(opt2, sched2, params2, 10)
    np.testing.assert_allclose(seen[:, 0], s.values(23)[13:], rtol=1e-14)


# ----------------------------------------------------------------------------- Robbins-Monro


def test_robbins_monro_closed_form_and_special_cases():
    s = RobbinsMonro(0.4, tau=5.0, gamma=0.75)
    for t in (0, 1, 5, 17, 1000):
        assert s(t) == pytest.approx(0.4 * (1 + t / 5.0) ** -0.75, rel=1e-15)
    c = RobbinsMonro.constant(0.05)
    assert {c(t) for t in range(100)} == {0.05}
    p = RobbinsMonro.power_law(0.3, 1.5)
    for step in (1, 2, 10, 99):  # c * s^-gamma in the 1-based step s = t + 1
        assert p(step - 1) == pytest.approx(0.3 * step**-1.5, rel=1e-15)


@pytest.mark.parametrize(
    ("gamma", "vanishes", "diverges", "summable", "rm", "lecture"),
    [
        (0.0, False, True, False, False, False),
        (0.4, True, True, False, False, True),  # erratum 3: lecture's pair holds, RM fails
        (0.5, True, True, False, False, True),
        (0.75, True, True, True, True, True),
        (1.0, True, True, True, True, True),
        (1.5, True, False, True, False, False),
    ],
)
def test_robbins_monro_conditions(gamma, vanishes, diverges, summable, rm, lecture):
    s = RobbinsMonro(1.0, tau=3.0, gamma=gamma)
    c = s.conditions()
    assert (c.vanishes, c.sum_diverges, c.squares_summable) == (vanishes, diverges, summable)
    assert (c.robbins_monro, c.lecture) == (rm, lecture)
    assert c.as_dict()["robbins_monro"] is rm and "Robbins-Monro" in str(c)
    # the report agrees with the series themselves
    assert math.isinf(s.partial_sum(math.inf)) is diverges
    assert math.isfinite(s.partial_sum(math.inf, power=2)) is summable
    assert (s(10**12) / s(0) < 1e-3) is vanishes


def test_partial_sums_infinite_series_equal_zeta_values():
    zeta2, zeta15, zeta3 = math.pi**2 / 6, 2.612375348685488, 1.2020569031595942
    assert RobbinsMonro.power_law(1.0, 2.0).partial_sum(math.inf) == pytest.approx(zeta2, 1e-14)
    assert RobbinsMonro.power_law(2.0, 1.5).partial_sum(math.inf) == pytest.approx(
        2 * zeta15, rel=1e-14
    )
    assert RobbinsMonro.power_law(2.0, 1.5).partial_sum(math.inf, power=2) == pytest.approx(
        4 * zeta3, rel=1e-14
    )
    # tau = 1/2: sum_{t>=0} (1 + 2t)^-2, the odd terms of zeta(2): (1 - 1/4) zeta(2) = pi^2/8
    assert RobbinsMonro(1.0, tau=0.5, gamma=2.0).partial_sum(math.inf) == pytest.approx(
        math.pi**2 / 8, rel=1e-14
    )


def test_partial_sum_harmonic_and_constant():
    T = 10**9
    euler = 0.5772156649015329
    harmonic = math.log(T) + euler + 1 / (2 * T) - 1 / (12 * T**2)
    assert RobbinsMonro.power_law(1.0, 1.0).partial_sum(T) == pytest.approx(harmonic, rel=1e-14)
    assert RobbinsMonro.constant(0.03).partial_sum(12345) == pytest.approx(0.03 * 12345, 1e-15)
    assert RobbinsMonro.constant(0.03).partial_sum(math.inf) == math.inf


@pytest.mark.parametrize("gamma", [0.4, 0.75, 1.0, 1.5])
@pytest.mark.parametrize("tau", [1.0, 7.3])
def test_partial_sum_euler_maclaurin_tail_equals_direct_sum(gamma, tau):
    """Beyond 2^20 steps the sum is head + Euler-Maclaurin tail; check it term by term."""
    s = RobbinsMonro(0.3, tau=tau, gamma=gamma)
    T = (1 << 20) + 17
    terms = (1.0 + np.arange(T) / tau) ** -gamma
    assert s.partial_sum(T) == pytest.approx(0.3 * math.fsum(terms.tolist()), rel=1e-14)
    assert s.partial_sum(T, power=2) == pytest.approx(
        0.09 * math.fsum((terms**2).tolist()), rel=1e-14
    )


# ----------------------------------------------------------------------------- vs torch


def _torch_lrs(make_scheduler, lr: float, steps: int) -> np.ndarray:
    params = _params(1)
    opt = torch.optim.SGD(params, lr=lr)
    sched = make_scheduler(opt)
    return _observed_lrs(opt, sched, params, steps)[:, 0]


def test_step_drops_equal_multisteplr_and_divide_by_ten():
    s = StepDrops(0.1, [30, 60, 80])  # He et al.: /10 (erratum 7), not /2
    assert (s(29), s(30), s(60), s(80)) == pytest.approx((0.1, 0.01, 0.001, 0.0001), rel=1e-15)
    ref = _torch_lrs(lambda o: L.MultiStepLR(o, [30, 60, 80], gamma=0.1), 0.1, 100)
    np.testing.assert_allclose(s.values(100), ref, rtol=1e-13)
    assert s.drops(59) == 1 and s.drops(60) == 2


def test_cosine_equals_cosineannealinglr_up_to_T_then_holds_floor():
    T, eta_min = 50, 0.001
    s = Cosine(0.2, total_steps=T, eta_min=eta_min)
    ref = _torch_lrs(lambda o: L.CosineAnnealingLR(o, T_max=T, eta_min=eta_min), 0.2, T + 1)
    np.testing.assert_allclose(s.values(T + 1), ref, rtol=1e-12, atol=1e-15)
    for t in range(T + 1):
        closed = eta_min + (0.2 - eta_min) * (1 + math.cos(math.pi * t / T)) / 2
        assert s(t) == pytest.approx(closed, rel=1e-15)
    assert s(T) == pytest.approx(eta_min, rel=1e-15) and s(T + 7) == eta_min


@pytest.mark.parametrize(("T0", "mult"), [(7, 1), (5, 2), (3, 3)])
def test_cyclic_cosine_equals_cosineannealingwarmrestarts(T0, mult):
    s = CyclicCosine(0.2, cycle_steps=T0, cycle_mult=mult, eta_min=0.01)
    ref = _torch_lrs(
        lambda o: L.CosineAnnealingWarmRestarts(o, T_0=T0, T_mult=mult, eta_min=0.01), 0.2, 120
    )
    np.testing.assert_allclose(s.values(120), ref, rtol=1e-13)


def test_snapshot_ensemble_matches_huang_et_al_formula_and_snapshot_points():
    T, M, a0 = 250, 4, 0.2
    s = CyclicCosine.snapshot_ensemble(a0, total_steps=T, snapshots=M)
    cycle = math.ceil(T / M)
    for t1 in range(1, T + 1):  # Huang et al. eq. 2, with 1-based iteration t1 = t + 1
        huang = a0 / 2 * (math.cos(math.pi * ((t1 - 1) % cycle) / cycle) + 1)
        assert s(t1 - 1) == pytest.approx(huang, rel=1e-14, abs=1e-16)
    snaps = s.snapshot_steps(M * cycle)
    assert snaps == [cycle * (i + 1) - 1 for i in range(M)]
    for i, t in enumerate(snaps):
        within = s.values(M * cycle)[i * cycle : (i + 1) * cycle]
        assert s(t) == within.min() and int(np.argmin(within)) == cycle - 1
        assert s(t + 1) == a0  # warm restart right after the snapshot
    assert s.snapshot_steps(T) == snaps[:-1]  # the last cycle is cut short at T = 250
    growing = CyclicCosine(1.0, cycle_steps=7, cycle_mult=2)
    assert growing.snapshot_steps(60) == [6, 20, 48]
    assert [growing.cycle_position(t) for t in (6, 7, 20, 21)] == [
        (0, 6, 7),
        (1, 0, 14),
        (1, 13, 14),
        (2, 0, 28),
    ]


def test_warmup_on_constant_equals_linearlr():
    f0, W = 0.25, 9
    s = Warmup(RobbinsMonro.constant(0.4), steps=W, start_factor=f0)
    ref = _torch_lrs(lambda o: L.LinearLR(o, start_factor=f0, total_iters=W), 0.4, 30)
    np.testing.assert_allclose(s.values(30), ref, rtol=1e-13)


def test_warmup_goyal_linear_scaling_and_shift():
    inner = StepDrops(0.8, [30, 60])
    s = Warmup.linear_scaling(inner, steps=10, batch_ratio=8)
    assert s(0) == pytest.approx(0.1) and s(10) == 0.8 and s(30) == inner(30)
    np.testing.assert_allclose(np.diff(s.values(11)), 0.07, rtol=1e-12)  # constant increments
    shifted = Warmup(Cosine(0.3, 30), steps=5, shift=True)
    assert shifted(5) == 0.3 and shifted(5 + 12) == Cosine(0.3, 30)(12)


def test_warmup_then_drops_equals_torch_chained_linear_and_multistep():
    W, f0, ms = 8, 0.125, [20, 30]
    ours = Warmup(StepDrops(0.8, ms, factor=5.0), steps=W, start_factor=f0)
    ref = _torch_lrs(
        lambda o: L.ChainedScheduler(
            [L.LinearLR(o, f0, total_iters=W), L.MultiStepLR(o, ms, gamma=0.2)]
        ),
        0.8,
        45,
    )
    np.testing.assert_allclose(ours.values(45), ref, rtol=1e-13)
    # chainable mode: our warmup on a constant, chained with torch's MultiStepLR
    chained = _torch_lrs(
        lambda o: L.ChainedScheduler(
            [
                attach(o, Warmup(RobbinsMonro.constant(0.8), W, f0), chainable=True),
                L.MultiStepLR(o, ms, gamma=0.2),
            ]
        ),
        0.8,
        45,
    )
    np.testing.assert_allclose(chained, ref, rtol=1e-13)


def test_sequentiallr_hands_over_to_closed_form():
    W, f0 = 6, 0.5
    ref = Warmup(Cosine(0.3, 20), steps=W, start_factor=f0, shift=True)

    def make(o):
        return L.SequentialLR(
            o, [L.LinearLR(o, f0, total_iters=W), attach(o, Cosine(0.3, 20))], milestones=[W]
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own notes on SequentialLR
        seen = _torch_lrs(make, 0.3, 30)
    np.testing.assert_allclose(seen, ref.values(30), rtol=1e-13)


def test_chainable_mode_refuses_a_zero_rate():
    params = _params(1)
    opt = torch.optim.SGD(params, lr=0.1)
    sched = attach(opt, Cosine(0.1, total_steps=3), chainable=True)
    _observed_lrs(opt, sched, params, 3)  # lrs at t = 0, 1, 2; the scheduler is now at t = 3
    opt.step()
    with pytest.raises(
        ValueError, match=r"chainable=True needs schedule values > 0.*schedule\(3\)"
    ):
        sched.step()


# ----------------------------------------------------------------------------- batch ramp


def test_batch_size_ramp_closed_form_and_noise_scale():
    r = BatchSizeRamp(
        0.1, batch_size=128, milestones=[100, 200, 300], factor=5, max_batch_size=5000
    )
    drops = r.equivalent_lr_schedule()
    for t in range(400):
        n = sum(m <= t for m in (100, 200, 300))
        B = min(128 * 5**n, 5000)
        assert r.batch_size(t) == B
        assert r(t) == pytest.approx(0.1 * B / (128 * 5**n), rel=1e-15)
        assert r.noise_scale(t) == pytest.approx(drops(t) / 128, rel=1e-14)
    assert r(299) == 0.1 and r(300) == pytest.approx(0.1 * 5000 / 16000)
    # Smith et al.: the same noise schedule for fewer parameter updates
    E = r.examples(400)
    assert E == sum(r.batch_size(t) for t in range(400))
    assert r.steps_for_examples(E) == 400
    assert r.steps_for_examples(E + 1) == 401 and r.steps_for_examples(0) == 0
    assert r.steps_for_examples(128 * 400) < 400


def test_batch_size_ramp_with_sgdlab_sgd_under_linear_rule():
    """set_batch_size(B_t) + the equivalent step drops = the ramp's per-step rate."""
    from sgdlab.optim import SGD

    r = BatchSizeRamp(0.05, batch_size=16, milestones=[5, 9, 12], factor=4, max_batch_size=512)
    params = _params(1)
    opt = SGD(params, lr=r.base, scaling="linear", ref_batch_size=16, batch_size=16)
    sched = attach(opt, r.equivalent_lr_schedule())
    seen = []
    for t in range(16):
        opt.set_batch_size(r.batch_size(t))
        seen.append(_observed_lrs(opt, None, params, 1)[0, 0])
        sched.step()
    np.testing.assert_allclose(seen, r.values(16), rtol=1e-14)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: RobbinsMonro(0.0), r"eta0 must be finite and > 0, got 0.0"),
        (lambda: RobbinsMonro(0.1, tau=-1), r"tau must be finite and > 0, got -1"),
        (lambda: RobbinsMonro(0.1, gamma=-0.5), r"gamma must be finite and >= 0, got -0.5"),
        (lambda: RobbinsMonro(0.1, gamma=float("nan")), r"gamma must be a finite real number"),
        (lambda: RobbinsMonro(0.1).partial_sum(-3), r"steps must be an integer step >= 0"),
        (lambda: RobbinsMonro(0.1).partial_sum(5, power=0), r"power must be finite and > 0"),
        (lambda: StepDrops(0.1, [5, 5]), r"milestones must be strictly increasing, got \[5, 5\]"),
        (lambda: StepDrops(0.1, [0, 5]), r"milestones\[0\] must be an integer >= 1, got 0"),
        (lambda: StepDrops(0.1, 5), r"milestones must be an iterable"),
        (lambda: StepDrops(0.1, [5], factor=0.5), r"factor must be a finite divisor > 1"),
        (lambda: Cosine(0.1, 0), r"total_steps must be an integer >= 1, got 0"),
        (lambda: Cosine(0.1, 10, eta_min=0.2), r"eta_min must satisfy 0 <= eta_min <= base"),
        (lambda: CyclicCosine(0.1, 5, cycle_mult=1.5), r"cycle_mult must be an integer >= 1"),
        (
            lambda: CyclicCosine.snapshot_ensemble(0.1, 3, 5),
            r"snapshots must be <= total_steps = 3",
        ),
        (lambda: Warmup(Cosine(0.1, 5), 0), r"steps must be an integer >= 1, got 0"),
        (lambda: Warmup(Cosine(0.1, 5), 3, start_factor=0), r"start_factor must satisfy 0 <"),
        (lambda: Warmup.linear_scaling(Cosine(0.1, 5), 3, 0.5), r"batch_ratio must be >= 1"),
        (lambda: BatchSizeRamp(0.1, 0, [3]), r"batch_size must be an integer >= 1, got 0"),
        (lambda: BatchSizeRamp(0.1, 8, [3], factor=1), r"factor must be a finite growth factor"),
        (lambda: BatchSizeRamp(0.1, 8, [3], max_batch_size=4), r"max_batch_size must be >= "),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_attach_rejects_non_schedules():
    opt = torch.optim.SGD(_params(1), lr=0.1)
    with pytest.raises(TypeError, match=r"schedule must be a sgdlab Schedule, got function"):
        attach(opt, lambda t: 0.1)
    with pytest.raises(TypeError, match=r"schedule must be a sgdlab Schedule"):
        Warmup(lambda t: 0.1, 3)


def test_public_names():
    assert set(S.__all__) >= {
        "RobbinsMonro",
        "StepDrops",
        "Cosine",
        "CyclicCosine",
        "Warmup",
        "BatchSizeRamp",
        "attach",
        "ScheduleLR",
    }


@pytest.mark.parametrize("T,M", [(300, 7), (10, 3), (300, 3), (60, 60), (61, 60)])
def test_snapshot_count_is_as_documented(T, M):
    """M snapshots where M divides T, floor(T / ceil(T/M)) (fewer) otherwise."""
    s = CyclicCosine.snapshot_ensemble(0.1, total_steps=T, snapshots=M)
    count = len(s.snapshot_steps(T))
    assert count == T // math.ceil(T / M)
    assert count == M if T % M == 0 else count < M
