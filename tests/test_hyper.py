"""Property tests of the hyperparameter algebra (sgdlab.hyper)."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sgdlab import hyper
from sgdlab.hyper import Conjugate, PerStep

rules = st.sampled_from(hyper.RULES)
forms = st.sampled_from(hyper.MOMENTUM_FORMS)
batch = st.integers(min_value=1, max_value=4096)
lr = st.floats(min_value=1e-7, max_value=10.0)
beta = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=0.9999))
horizon = st.one_of(st.just(1.0), st.floats(min_value=1.0, max_value=1e6))
eps = st.one_of(st.just(0.0), st.floats(min_value=1e-12, max_value=1e-2))

per_step = st.builds(PerStep, lr=lr, beta1=beta, beta2=beta, eps=eps)
conjugate = st.builds(Conjugate, eta_prime=lr, n_g=horizon, n_s=horizon, eps=eps)


def close(a: PerStep | Conjugate, b: PerStep | Conjugate, rel: float = 1e-9) -> bool:
    fields = (
        ("lr", "beta1", "beta2", "eps")
        if isinstance(a, PerStep)
        else ("eta_prime", "n_g", "n_s", "eps")
    )
    return all(
        math.isclose(getattr(a, f), getattr(b, f), rel_tol=rel, abs_tol=1e-300) for f in fields
    )


@settings(max_examples=300, deadline=None)
@given(per_step, batch, rules, forms)
def test_per_step_round_trip_is_identity(step, b, rule, form):
    back = hyper.to_per_step(hyper.to_conjugate(step, b, rule, form), b, rule, form)
    # beta close to 1 loses digits in 1/(1-beta); compare horizons where it matters
    assert math.isclose(back.lr, step.lr, rel_tol=1e-9)
    for name in ("beta1", "beta2"):
        x, y = getattr(back, name), getattr(step, name)
        assert math.isclose(1 - x, 1 - y, rel_tol=1e-6, abs_tol=1e-12)
    assert math.isclose(back.eps, step.eps, rel_tol=1e-9, abs_tol=1e-300)


@settings(max_examples=300, deadline=None)
@given(conjugate, batch, rules, forms)
def test_conjugate_round_trip_is_identity_where_invertible(conj, b, rule, form):
    if rule == "lecture":
        # N(B) = max(1, N'/B) forgets N' below B (documented); elsewhere it is invertible.
        assume(conj.n_g == 1.0 or conj.n_g >= b)
        assume(conj.n_s == 1.0 or conj.n_s >= b)
    if rule == "sqrt":
        # beyond B = N'/2, beta_B = (1/2)^(2B/N') (or (1 - 1/N')^B) must not underflow
        for n in (conj.n_g, conj.n_s):
            assume(n == 1.0 or b <= n / 2 or hyper.steps_decay(n, b, "sqrt") > 1e-300)
    if rule == "exact":
        # beta_B = (1 - 1/N')^B must not underflow float64 (then no average is left to invert)
        for n in (conj.n_g, conj.n_s):
            assume(n == 1.0 or b * math.log1p(-1.0 / n) > -700)
    back = hyper.to_conjugate(hyper.to_per_step(conj, b, rule, form), b, rule, form)
    assert close(back, conj, rel=1e-6)


@settings(max_examples=200, deadline=None)
@given(per_step, batch, rules, forms)
def test_same_batch_size_changes_nothing(step, b, rule, form):
    assert hyper.rescale(step, b, b, rule, form) == step


@settings(max_examples=200, deadline=None)
@given(per_step, batch, batch, batch, rules, forms)
def test_rescale_composes(step, b0, b1, b2, rule, form):
    """Moving B0 -> B1 -> B2 equals B0 -> B2 where no horizon is clamped at 1 (lecture) or
    underflows (exact, sqrt)."""
    if rule == "lecture":
        for beta_ in (step.beta1, step.beta2):
            if beta_ > 0:
                assume((1 / (1 - beta_)) * b0 / max(b1, b2) >= 1.0)
    if rule == "sqrt":
        # the sqrt rule is invertible at every batch size (no clamp) while beta_B stays a
        # normal float: at most (1/2)^(2 B/N') with N' >= B0
        for beta_ in (step.beta1, step.beta2):
            if beta_ > 0:
                assume(math.log(min(beta_, 0.5)) * max(b1, b2) / b0 > -600)
    if rule == "exact":
        # beta^(B/B0) must stay a normal float at every stop (an underflow to 0 loses beta)
        for beta_ in (step.beta1, step.beta2):
            if beta_ > 0:
                assume(math.log(beta_) * max(b1, b2) / b0 > -700)
    direct = hyper.rescale(step, b0, b2, rule, form)
    via = hyper.rescale(hyper.rescale(step, b0, b1, rule, form), b1, b2, rule, form)
    assert math.isclose(direct.lr, via.lr, rel_tol=1e-8)
    assert math.isclose(1 - direct.beta1, 1 - via.beta1, rel_tol=1e-6, abs_tol=1e-12)
    assert math.isclose(1 - direct.beta2, 1 - via.beta2, rel_tol=1e-6, abs_tol=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=10.0, max_value=1e6), st.integers(min_value=1, max_value=64))
def test_exact_and_lecture_agree_to_first_order(n_examples, b):
    """(1 - 1/N')^B = 1 - B/N' + O((B/N')^2): the exact horizon is N'/B + (B-1)/(2B) + ...,
    so the rules' relative difference is O(B/N')."""
    assume(n_examples >= 10 * b)
    exact = hyper.steps_horizon(n_examples, b, "exact")
    lecture = hyper.steps_horizon(n_examples, b, "lecture")
    assert abs(exact - lecture) / lecture <= b / n_examples
    # and to second order the offset is (B - 1)/2 / ... exactly: N_exact - N'/B -> (B-1)/(2B)
    assert exact - n_examples / b == pytest.approx((b - 1) / (2 * b), abs=b / n_examples + 1e-6)


@settings(max_examples=100, deadline=None)
@given(per_step, batch, st.integers(min_value=1, max_value=16))
def test_rules_coincide_for_lr_as_stated(step, b0, k):
    """linear: lr x k, betas unchanged; sqrt: lr x sqrt(k), eps / sqrt(k) (ema form)."""
    b = b0 * k
    lin = hyper.rescale(step, b0, b, "linear", "ema")
    assert math.isclose(lin.lr, step.lr * k, rel_tol=1e-12)
    assert math.isclose(1 - lin.beta1, 1 - step.beta1, rel_tol=1e-9, abs_tol=1e-15)
    sq = hyper.rescale(step, b0, b, "sqrt", "ema")
    assert math.isclose(sq.lr, step.lr * math.sqrt(k), rel_tol=1e-12)
    assert math.isclose(sq.eps, step.eps / math.sqrt(k), rel_tol=1e-12, abs_tol=1e-300)
    n = 1 / (1 - step.beta2)
    if n / k >= 2.0:  # the linear form 1 - beta_B = k (1 - beta) (beyond: tested below)
        assert math.isclose(1 / (1 - sq.beta2), n / k, rel_tol=1e-6)


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=1.0, max_value=1e5), batch)
def test_sqrt_rule_stays_a_decay_and_is_continuous(n, b):
    """The sqrt rule's beta_B is in [0, 1) for every B (0 only for N' = 1 or an underflow), is
    1 - B/N' up to B* = max(1, N'/2), decreases in B, and is continuous at B*: it was
    clamped at 0 from B = N' on (beta1 0.9 tuned at 32 became 0 at 512)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        beta = hyper.steps_decay(n, b, "sqrt")
        assert 0.0 <= beta < 1.0
        assert beta > 0.0 or n == 1.0 or b * math.log1p(-1.0 / n) < -700 or b > 300 * n
        if b <= max(1.0, n / 2):
            assert beta == pytest.approx(1.0 - b / n, rel=1e-12, abs=1e-15)
        assert hyper.steps_decay(n, b + 1, "sqrt") <= beta
        if n >= 4.0:  # continuity at B* = N'/2: the two branches meet at beta = 1/2
            left = hyper.steps_decay(n, math.floor(n / 2), "sqrt")
            right = hyper.steps_decay(n, math.floor(n / 2) + 1, "sqrt")
            assert left - right <= 2.0 / n  # one step of B moves beta by about 1/N'
            assert left >= 0.5 >= right


def test_sqrt_rule_beyond_the_linear_range_warns_once(monkeypatch):
    """The README's own example, 32 -> 512 from (0.9, 0.999): (0.109, 0.984), not the clamped
    (0.0, 0.984); a UserWarning names the switch, once per process."""
    import warnings

    monkeypatch.setattr(hyper, "_WARNED", set())
    step = PerStep(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s256 = hyper.rescale(step, 32, 256, "sqrt")
        s512 = hyper.rescale(step, 32, 512, "sqrt")
        hyper.rescale(step, 32, 1024, "sqrt")
    assert len(caught) == 1 and issubclass(caught[0].category, UserWarning)
    assert "scaling rule 'sqrt'" in str(caught[0].message)
    assert s512.beta1 == pytest.approx(0.5 ** (512 / 160), rel=1e-12)  # 0.1088
    assert round(s512.beta1, 3) == 0.109 and s512.beta2 == pytest.approx(0.984, rel=1e-12)
    assert s256.beta1 == pytest.approx(0.5 ** (256 / 160), rel=1e-12)  # 0.330, was 0.2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s128 = hyper.rescale(step, 32, 128, "sqrt")  # linear range: no warning
    assert not caught and s128.beta1 == pytest.approx(0.6, rel=1e-12)
    # the README's code: Adam tuned at 32, run at 256, then 512
    import torch

    import sgdlab

    opt = sgdlab.Adam(
        [torch.zeros(1, requires_grad=True)],
        lr=1e-3,
        betas=(0.9, 0.999),
        ref_batch_size=32,
        batch_size=256,
        scaling="sqrt",
    )
    opt.set_batch_size(512)
    betas = opt.effective_hyperparameters(opt.param_groups[0])["betas"]
    assert betas == pytest.approx((s512.beta1, s512.beta2), rel=1e-15)


def test_exact_rule_is_beta_to_the_power_b():
    s = hyper.rescale(PerStep(lr=0.1, beta1=0.9, beta2=0.99), 1, 8, "exact", "ema")
    assert s.beta1 == pytest.approx(0.9**8, rel=1e-12)
    assert s.beta2 == pytest.approx(0.99**8, rel=1e-12)


def test_lecture_rule_as_corrected():
    """Erratum 1: N_g = max(1, N'_g/B); the literal min(1, N'_g/B) would give N_g <= 1."""
    c = Conjugate(eta_prime=1e-3, n_g=100.0)
    small = hyper.to_per_step(c, 10, "lecture", "heavy_ball")
    assert 1 / (1 - small.beta1) == pytest.approx(10.0)
    assert small.lr == pytest.approx(10 * 1e-3 / 10)
    large = hyper.to_per_step(c, 1000, "lecture", "heavy_ball")
    assert large.beta1 == 0.0 and large.lr == pytest.approx(1.0)


def test_no_momentum_stays_no_momentum():
    s = PerStep(lr=0.1, beta1=0.0)
    for rule in hyper.RULES:
        for b in (1, 3, 1000):
            assert hyper.rescale(s, 64, b, rule, "heavy_ball").beta1 == 0.0


BAD = [
    (lambda: Conjugate(eta_prime=0.0), r"eta_prime must be finite and > 0, got 0\.0"),
    (lambda: Conjugate(eta_prime=float("nan")), r"eta_prime must be a finite real number"),
    (lambda: Conjugate(eta_prime=1.0, n_g=0.5), r"n_g must be a horizon >= 1.*got 0\.5"),
    (lambda: Conjugate(eta_prime=1.0, n_s=-3), r"n_s must be a horizon >= 1.*got -3"),
    (lambda: PerStep(lr=-1.0), r"lr must be finite and > 0, got -1\.0"),
    (lambda: PerStep(lr=float("inf")), r"lr must be a finite real number, got inf"),
    (lambda: PerStep(lr=1.0, beta1=1.0), r"beta1 must satisfy 0 <= value < 1, got 1\.0"),
    (lambda: hyper.rescale(PerStep(lr=1.0), 0, 4), r"from_batch_size must be an integer >= 1"),
    (lambda: hyper.rescale(PerStep(lr=1.0), 4, 2.5), r"to_batch_size must be an integer >= 1"),
    (
        lambda: hyper.rescale(PerStep(lr=1.0), 4, 8, "cubic"),
        r"rule must be one of 'lecture', 'exact', 'sqrt', 'linear'; got 'cubic'",
    ),
    (
        lambda: hyper.to_per_step(Conjugate(1.0), 4, "lecture", "nesterov"),
        r"momentum_form must be one of 'ema', 'heavy_ball'; got 'nesterov'",
    ),
    (lambda: hyper.steps_horizon(0.2, 4, "exact"), r"n_examples must be a horizon >= 1"),
    (lambda: hyper.beta_to_horizon(1.0), r"beta must satisfy 0 <= value < 1"),
]


@pytest.mark.parametrize("call,pattern", BAD)
def test_invalid_values_raise_naming_parameter_value_and_allowed(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_numpy_and_torch_scalars_become_floats():
    """Hyperparameters given as numpy or torch scalars are stored as floats (an np.float32 lr
    came back from to_per_step, a float32 tensor lr went into the optimizer's param group)."""
    import numpy as np
    import torch

    import sgdlab

    c = hyper.Conjugate(np.float32(1e-3), n_g=np.float64(100.0), n_s=torch.tensor(1000.0))
    assert all(type(v) is float for v in (c.eta_prime, c.n_g, c.n_s, c.eps))
    step = hyper.to_per_step(c, 4, "exact")
    assert all(type(v) is float for v in (step.lr, step.beta1, step.beta2, step.eps))
    p = hyper.PerStep(torch.tensor(0.1), np.float32(0.9))
    assert type(p.lr) is float and type(p.beta1) is float
    opt = sgdlab.SGD.from_conjugate(
        [torch.zeros(2, requires_grad=True)], eta_prime=torch.tensor(1e-3), batch_size=4
    )
    assert type(opt.param_groups[0]["lr"]) is float


def test_rescale_names_its_inputs_when_float64_cannot_hold_the_result():
    with pytest.raises(ValueError, match="from batch size 1152921504606846976 to 1"):
        hyper.rescale(PerStep(1e-3, 0.9, 0.999), 2**60, 1, "lecture")
    with pytest.raises(TypeError, match="step must be a PerStep"):
        hyper.rescale(Conjugate(1e-3), 8, 8)
