"""Estimators (means with standard errors, slope fit, KS distance) and the
fluctuation-dissipation stationarity test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgdlab.dynamics import (
    FluctuationDissipationTest,
    MeanEstimation,
    Quadratic,
    estimate_mean,
    excess_loss,
    fit_excess_slope,
    ks_distance,
    quadratic_variance,
    z_score,
)

torch.set_num_threads(1)


def test_estimate_mean_matches_numpy_and_shapes():
    x = np.random.default_rng(0).standard_normal((50, 3))
    m, se = estimate_mean(torch.as_tensor(x))
    np.testing.assert_allclose(m, x.mean(0))
    np.testing.assert_allclose(se, x.std(0, ddof=1) / np.sqrt(50))
    m1, se1 = estimate_mean(x[:, 0])
    assert isinstance(m1, float) and se1 == pytest.approx(se[0])
    with pytest.raises(ValueError, match="chains"):
        estimate_mean([1.0])
    with pytest.raises(ValueError, match="non-finite"):
        estimate_mean([1.0, np.nan])
    with pytest.raises(ValueError, match="stderr"):
        z_score(1.0, 0.0, 1.0)


def test_standard_error_calibrated_across_repetitions():
    # z-scores of the mean of iid exponential samples: about 95% within 2
    rng = np.random.default_rng(1)
    zs = [z_score(*estimate_mean(rng.exponential(size=400)), 1.0) for _ in range(400)]
    frac = np.mean(np.abs(zs) < 2)
    assert 0.92 < frac < 0.98


def test_fit_excess_slope_recovers_exact_expansion():
    # noiseless exact L(eta) of the 1-D quadratic: slope sigma^2/(4B); cubic fit, small etas
    lrs = np.array([0.01, 0.02, 0.04, 0.08])
    y = np.array([excess_loss(1.0, 1.0, e, 2) for e in lrs])
    a, se = fit_excess_slope(lrs, y, 1e-6 * np.ones(4), degree=3)
    assert a == pytest.approx(1.0 / 8, rel=1e-4)
    a1, _ = fit_excess_slope(lrs, y, np.ones(4), degree=1)
    assert a1 > 1.0 / 8  # ignoring curvature biases the slope up
    with pytest.raises(ValueError, match="same length"):
        fit_excess_slope([0.1, 0.2], [1.0], [1.0, 1.0])


def test_ks_distance_detects_wrong_variance():
    from scipy.stats import norm

    x = np.random.default_rng(2).standard_normal(4000)
    D, p = ks_distance(x, norm.cdf)
    assert D * np.sqrt(4000) < 1.95 and p > 1e-3
    D2, p2 = ks_distance(x, norm(scale=1.3).cdf)
    assert p2 < 1e-6


def _run_with_test(problem, lr, steps, chains, init, seed=0):
    gen = torch.Generator().manual_seed(seed)
    test = FluctuationDissipationTest(center=problem.optimum)
    phi = torch.as_tensor(init, dtype=torch.float64).clone()
    for _ in range(steps):
        g = problem.sample_grad(phi, 1, gen)
        test.update(phi, g, lr)
        phi = phi - lr * g
    return test


def test_fdr_statistic_zero_mean_at_stationarity():
    V = quadratic_variance(1.0, 0.1)
    R = 2000
    init = (
        torch.randn(R, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * V**0.5
    )
    test = _run_with_test(Quadratic(1.0, 1.0), 0.1, 400, R, init)
    assert abs(test.z()) < 4
    assert test.is_stationary(tolerance=0.05)


def test_fdr_rejects_a_chain_still_descending():
    test = _run_with_test(Quadratic(1.0, 1.0), 0.01, 200, 1, [[5.0]])
    assert test.z() > 4
    assert not test.is_stationary()


def test_fdr_triggers_learning_rate_drops_in_a_training_loop():
    # single model trained with torch.optim.SGD on the 1-D example; drop lr by 10 when
    # stationary. The drops must come after the transient (relaxation time 1/(eta h)).
    problem = MeanEstimation.standardized(200, 1.0, seed=4)
    y = torch.as_tensor(problem.data[:, 0])
    w = torch.nn.Parameter(torch.tensor([8.0], dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.1)
    test = FluctuationDissipationTest(keep=0.5)
    gen = torch.Generator().manual_seed(5)
    drops = []
    for step in range(3000):
        i = torch.randint(0, 200, (1,), generator=gen)
        opt.zero_grad()
        loss = 0.5 * ((w - y[i]) ** 2).mean()
        loss.backward()
        test.update(w, w.grad, opt.param_groups[0]["lr"])
        opt.step()
        if step % 50 == 49 and test.steps >= 500 and test.is_stationary(tolerance=0.2):
            drops.append(step)
            opt.param_groups[0]["lr"] /= 10
            test.reset()
    assert len(drops) >= 1
    assert drops[0] > 60  # 1/(eta h) = 10 steps: distance 8 needs several relaxation times
    # after the drops the iterate is near the optimum (variance eta sigma^2 / 2 ~ 0.005)
    assert abs(w.item() - float(problem.optimum[0])) < 0.5


def test_fdr_bad_input():
    with pytest.raises(ValueError, match="keep"):
        FluctuationDissipationTest(keep=1.5)
    t = FluctuationDissipationTest()
    with pytest.raises(ValueError, match="shapes"):
        t.update(torch.zeros(2), torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="lr"):
        t.update(torch.zeros(2), torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="steps"):
        t.statistic()
