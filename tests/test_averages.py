"""Running averages against closed forms, float64 identities and Monte Carlo (|z| < 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sgdlab import averages as A
from sgdlab.averages import RunningAverage

F64 = torch.float64


def _stream(seed: int, t: int, shape: tuple[int, ...], mu: float = 1.5, sigma: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return mu + sigma * torch.randn((t, *shape), generator=g, dtype=F64)


def _run(kind: str, xs: torch.Tensor, N=None) -> list[torch.Tensor]:
    """Feed ``xs`` one step at a time; ``N`` is None, one horizon, or one horizon per step."""
    per_step = N is not None and not np.isscalar(N)
    avg = RunningAverage(kind, horizon=N[0] if per_step else N)
    return [avg.update(x, horizon=N[i] if per_step else None) for i, x in enumerate(xs)]


def _zscore(estimate: float, reference: float, se: float) -> float:
    return (estimate - reference) / se


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("N", [1.0, 3.0, 20.0, 7.5])
@pytest.mark.parametrize("t", [1, 2, 5, 20, 100])
def test_weight_formulas(t, N):
    beta = 1 - 1 / N
    assert A.weight("ema", t, N) == 1 / N
    assert A.weight("lecture", t, N) == 1 / min(N, t)
    assert A.weight("mean", t) == 1 / t
    assert A.weight("adam", t, N) == pytest.approx((1 - beta) / (1 - beta**t), rel=1e-14)


def test_adam_weight_at_first_step_is_one_and_debias_factor_is_accurate_for_huge_N():
    assert A.weight("adam", 1, 20) == pytest.approx(1.0, rel=1e-15)
    N, t = 1e12, 3
    series = t / N - t * (t - 1) / (2 * N**2)  # 1-(1-1/N)^t to O(N^-3)
    assert A.debias_factor(t, N) == pytest.approx(series, rel=1e-14)


def test_ema_explicit_sum_has_exponent_plus_t_minus_s():
    """Erratum 4: mu_t = (1/N) sum_s (1-1/N)^{+(t-s)} x_s; the slide's minus sign is wrong."""
    N, t = 8.0, 30
    xs = _stream(0, t, ())
    beta = 1 - 1 / N
    est = _run("ema", xs, N)[-1].item()
    s = np.arange(1, t + 1)
    plus = float(np.sum(beta ** (t - s) * xs.numpy()) / N)
    minus = float(np.sum(beta ** (-(t - s)) * xs.numpy()) / N)
    assert est == pytest.approx(plus, rel=1e-13)
    assert abs(minus - est) > 1.0
    # sum_{n>=0} beta^n = N (exponent +n); with -n every term is >= 1, so N terms pass N.
    n = np.arange(20000)
    assert math.fsum(beta**n) == pytest.approx(N, rel=1e-12)
    assert math.fsum(beta ** (-n[: int(N)])) > N


@pytest.mark.parametrize("N", [5.0, 12.5])
def test_sample_weights_match_explicit_forms(N):
    t = 40
    beta = 1 - 1 / N
    s = np.arange(1, t + 1)
    np.testing.assert_allclose(A.sample_weights("ema", t, N), beta ** (t - s) / N, rtol=1e-13)
    adam = (1 - beta) * beta ** (t - s) / (1 - beta**t)
    np.testing.assert_allclose(A.sample_weights("adam", t, N), adam, rtol=1e-13)
    np.testing.assert_allclose(A.sample_weights("mean", t), np.full(t, 1 / t), rtol=1e-13)
    m = math.floor(N)  # the lecture average is the exact mean of x_1..x_m, then the EMA
    lecture = np.where(s <= m, beta ** (t - m) / m, beta ** (t - s) / N)
    np.testing.assert_allclose(A.sample_weights("lecture", t, N), lecture, rtol=1e-13)


# ----------------------------------------------------------------------------- identities


@pytest.mark.parametrize("kind", ["lecture", "mean"])
def test_exact_mean_for_t_up_to_N_in_float64(kind):
    N, shape = 50, (7, 3)
    xs = _stream(1, N, shape)
    ests = _run(kind, xs, float(N) if kind == "lecture" else None)
    for t in range(1, N + 1):
        torch.testing.assert_close(ests[t - 1], xs[:t].mean(0), rtol=1e-13, atol=1e-13)


def test_adam_kind_equals_kingma_ba_bias_correction():
    N, T = 20.0, 60
    beta = 1 - 1 / N
    xs = _stream(2, T, (5,))
    m = torch.zeros(5, dtype=F64)
    for t, (x, est) in enumerate(zip(xs, _run("adam", xs, N)), start=1):
        m = beta * m + (1 - beta) * x
        torch.testing.assert_close(est, m / (1 - beta**t), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("kind", A.KINDS)
def test_estimate_is_weighted_sum_with_changing_horizon(kind):
    """Batch size changes mid-stream: the horizon in steps jumps 10 -> 40 -> 4."""
    Ns = [10.0] * 15 + [40.0] * 30 + [4.0] * 15
    t = len(Ns)
    xs = _stream(3, t, (4,))
    est = _run(kind, xs, None if kind == "mean" else Ns)[-1]
    a = torch.as_tensor(A.sample_weights(kind, t, None if kind == "mean" else Ns))
    torch.testing.assert_close(est, (a[:, None] * xs).sum(0), rtol=1e-12, atol=1e-13)
    mass = math.fsum(a.tolist())
    if kind == "ema":
        assert mass == pytest.approx(1 - math.prod(1 - 1 / n for n in Ns), rel=1e-13)
    else:  # adam, lecture, mean stay unbiased whatever the horizons did
        assert mass == pytest.approx(1.0, rel=1e-13)


def test_lecture_count_grows_one_per_step_when_horizon_grows():
    avg = RunningAverage("lecture", horizon=3)
    for _ in range(5):
        avg.update(torch.zeros(1))
    assert avg.count == 3.0
    avg.update(torch.zeros(1), horizon=100)
    assert avg.count == 4.0 and avg.horizon == 100.0
    assert avg.next_weight() == 1 / 5
    avg.update(torch.zeros(1), horizon=2)
    assert avg.count == 2.0


def test_state_dict_resume_matches_uninterrupted_run():
    xs = _stream(4, 30, (2,))
    full = _run("adam", xs, 6.0)[-1]
    a = RunningAverage("adam", horizon=6.0)
    for x in xs[:11]:
        a.update(x)
    b = RunningAverage("adam", horizon=1.0)
    b.load_state_dict(a.state_dict())
    for x in xs[11:]:
        out = b.update(x)
    torch.testing.assert_close(out, full, rtol=0, atol=0)


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("kind", A.KINDS)
@pytest.mark.parametrize("N", [1.0, 4.0, 20.0, 6.5])
def test_closed_forms_equal_sums_over_sample_weights(kind, N):
    for t in [1, 2, 3, 6, 7, 20, 21, 80]:
        a = A.sample_weights(kind, t, N)
        assert A.mean_factor(kind, t, N) == pytest.approx(math.fsum(a), rel=1e-12)
        assert A.variance(kind, t, N, sigma2=2.5) == pytest.approx(
            2.5 * math.fsum(a * a), rel=1e-12
        )


def test_reference_values():
    assert A.adam_variance(20, 20) == pytest.approx(0.054298, abs=5e-7)
    assert A.adam_variance(1, 20) == pytest.approx(1.0, rel=1e-14)
    assert A.adam_variance(10_000, 20) == pytest.approx(1 / 39, rel=1e-12)
    assert A.ema_mean_factor(1, 20) == pytest.approx(1 / 20, rel=1e-14)
    assert A.ema_variance(100_000, 20, 3.0) == pytest.approx(A.ema_stationary_variance(20, 3.0))
    assert A.lecture_variance(20, 20) == A.mean_variance(20) == 1 / 20
    assert A.ema_stationary_variance(20) == 1 / 39


@pytest.mark.parametrize("N", [2.0, 10.0, 37.0])
def test_ema_matches_a_2N_minus_1_window_not_an_N_window(N):
    """Erratum 4: variance sigma^2/(2N-1) and mean lag N-1, both those of a (2N-1)-window."""
    W = A.equivalent_window(N)
    assert W == 2 * N - 1
    assert A.ema_stationary_variance(N) == pytest.approx(A.window_variance(W), rel=1e-15)
    assert A.ema_mean_lag(N) == pytest.approx(A.window_mean_lag(W), rel=1e-15)
    # an N-window is off by (2N-1)/N in variance and by a factor 2 in lag
    ratio = A.window_variance(N) / A.ema_stationary_variance(N)
    assert ratio == pytest.approx((2 * N - 1) / N, rel=1e-15)
    assert A.ema_mean_lag(N) == pytest.approx(2 * A.window_mean_lag(N), rel=1e-15)
    # the lag, measured: on x_s = s the stationary EMA trails by exactly N - 1 steps
    t = int(60 * N)
    avg = RunningAverage("ema", horizon=N)
    for s in range(1, t + 1):
        est = avg.update(torch.tensor(float(s), dtype=F64))
    assert t - est.item() == pytest.approx(A.ema_mean_lag(N), rel=1e-9)
    # the variance, from the weights: sum of squared stationary weights
    a = A.sample_weights("ema", t, N)
    assert math.fsum(a * a) == pytest.approx(A.ema_stationary_variance(N), rel=1e-12)


# ----------------------------------------------------------------------------- Monte Carlo

R = 20_000
MU, SIGMA = 1.5, 2.0


def _chains(seed: int, t: int) -> torch.Tensor:
    return _stream(seed, t, (R,), MU, SIGMA)


def _mean_z(samples: torch.Tensor, reference: float) -> float:
    return _zscore(samples.mean().item(), reference, samples.std().item() / math.sqrt(R))


def _var_z(samples: torch.Tensor, reference: float, mean: float) -> float:
    sq = (samples - mean) ** 2
    return _zscore(sq.mean().item(), reference, sq.std().item() / math.sqrt(R))


def test_mc_ema_first_step_mean_is_mu_over_N():
    N = 20.0
    xs = _chains(10, 5)
    ests = _run("ema", xs, N)
    for t in (1, 5):
        z = _mean_z(ests[t - 1], A.ema_mean_factor(t, N) * MU)
        assert abs(z) < 4, z
    assert A.ema_mean_factor(1, N) * MU == pytest.approx(MU / N)


def test_mc_adam_corrected_variance_at_t_equals_N_20():
    N, t = 20.0, 20
    est = _run("adam", _chains(11, t), N)[-1]
    assert abs(_mean_z(est, MU)) < 4
    z = _var_z(est, A.adam_variance(t, N, SIGMA**2), MU)
    assert abs(z) < 4, z
    # and it is distinguishable from the stationary EMA value it tends to
    assert abs(_var_z(est, A.ema_stationary_variance(N, SIGMA**2), MU)) > 4


def test_mc_lecture_is_exact_mean_variance_before_N_then_ema_like():
    N = 20.0
    ests = _run("lecture", _chains(12, 60), N)
    for t in (7, 20, 60):
        assert abs(_mean_z(ests[t - 1], MU)) < 4
        z = _var_z(ests[t - 1], A.lecture_variance(t, N, SIGMA**2), MU)
        assert abs(z) < 4, (t, z)


def test_mc_stationary_ema_variance_time_averaged():
    """Protocol of REFERENCE.md: time-average each chain, error bar from the spread of chains."""
    N = 10.0
    burn, T = 200, 400  # beta^(2*burn) < 1e-18: the law at the end of burn-in is stationary
    g = torch.Generator().manual_seed(13)
    avg = RunningAverage("ema", horizon=N)
    acc = torch.zeros(R, dtype=F64)
    for step in range(burn + T):
        x = MU + SIGMA * torch.randn(R, generator=g, dtype=F64)
        est = avg.update(x)
        if step >= burn:
            acc += (est - MU) ** 2
    per_chain = acc / T
    ref = A.ema_stationary_variance(N, SIGMA**2)
    z = _zscore(per_chain.mean().item(), ref, per_chain.std().item() / math.sqrt(R))
    assert abs(z) < 4, z
    # an N-window's variance sigma^2/N is rejected by the same data
    z_window = _zscore(per_chain.mean().item(), SIGMA**2 / N, per_chain.std().item() / math.sqrt(R))
    assert abs(z_window) > 4


def test_mc_changing_horizon_adam_unbiased_with_predicted_variance():
    Ns = [5.0] * 8 + [30.0] * 12
    est = _run("adam", _chains(14, len(Ns)), Ns)[-1]
    a = A.sample_weights("adam", len(Ns), Ns)
    assert abs(_mean_z(est, MU)) < 4
    assert abs(_var_z(est, SIGMA**2 * float(np.sum(a * a)), MU)) < 4


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: A.weight("median", 1, 2), r"kind must be one of .*'median'"),
        (lambda: A.weight("ema", 0, 2), r"t must be an integer step >= 1, got 0"),
        (lambda: A.weight("ema", 1.5, 2), r"t must be an integer step >= 1, got 1.5"),
        (lambda: A.weight("ema", True, 2), r"t must be an integer step >= 1, got True"),
        (lambda: A.weight("ema", 3, 0.5), r"N must be a horizon >= 1.*0.5"),
        (lambda: A.weight("adam", 3, float("nan")), r"N must be a finite real number"),
        (lambda: A.weight("lecture", 3, None), r"N must be a finite real number.*None"),
        (lambda: A.sample_weights("ema", 3, [2.0, 2.0]), r"sequence of t = 3 horizons"),
        (lambda: A.sample_weights("ema", 2, [2.0, 0.0]), r"N\[1\] must be a horizon >= 1"),
        (lambda: A.ema_variance(3, 2, sigma2=-1), r"sigma2 must be finite and >= 0"),
        (lambda: RunningAverage("ema"), r"horizon must be a horizon >= 1 for kind='ema'"),
        (lambda: RunningAverage("ema", horizon=0), r"horizon must be a horizon >= 1.*0"),
        (lambda: RunningAverage("lecture", 4).update(1.0, horizon=-2), r"horizon .*-2"),
        (lambda: RunningAverage("mean").value, r"undefined before the first update"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_shape_change_raises():
    avg = RunningAverage("ema", horizon=3)
    avg.update(torch.zeros(2))
    with pytest.raises(ValueError, match=r"shape of earlier samples \(2,\), got \(3,\)"):
        avg.update(torch.zeros(3))
