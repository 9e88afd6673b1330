"""What torch users rely on: bit-identical resume, closures, zero_grad, skipped parameters,
non-finite gradients, and clear errors for bad hyperparameters."""

from __future__ import annotations

import pytest
import torch

import sgdlab
from sgdlab.optim import NonFiniteGradientError

from .cases import (
    ALL_CASES,
    checkpoint,
    make_params,
    param_groups,
    same_structure,
    set_grads,
    state_tensors,
)

CASES = ALL_CASES


@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_resume_is_bit_identical(name, cls, kwargs):
    per_example = kwargs.get("second_moment") == "per_example"
    scaled = "ref_batch_size" in kwargs
    batches = [8, 32, 4, 16]

    def run(opt, params, start, stop):
        for t in range(start, stop):
            set_grads(params, t, per_example)
            opt.step(batch_size=batches[t // 9 % 4] if scaled else None)

    params = make_params(11)
    opt = cls(param_groups(params, cls), **kwargs)
    run(opt, params, 0, 30)
    saved = checkpoint({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()})
    run(opt, params, 30, 60)

    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = cls(param_groups(resumed, cls), **kwargs)
    opt2.load_state_dict(saved["opt"])
    run(opt2, resumed, 30, 60)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    s1, s2 = state_tensors(opt), state_tensors(opt2)
    assert s1.keys() == s2.keys()
    for key in s1:
        same = (
            torch.equal(s1[key], s2[key])
            if isinstance(s1[key], torch.Tensor)
            else (s1[key] == s2[key])
        )
        assert same, key


def test_closure_is_evaluated_with_grad():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = sgdlab.Adam([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert torch.allclose(w.detach(), torch.tensor([0.9, 1.9]), atol=1e-6)


@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_parameters_without_grad_are_skipped(name, cls, kwargs):
    params = make_params(12)
    opt = cls(params, **kwargs)
    set_grads(params, 0, per_example=True)
    params[2].grad = None
    before = params[2].detach().clone()
    opt.step(batch_size=8 if "ref_batch_size" in kwargs else None)
    assert torch.equal(params[2].detach(), before)
    assert len(opt.state[params[2]]) == 0
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_nonfinite_gradient_raises_and_changes_nothing(name, cls, kwargs, bad):
    per_example = kwargs.get("second_moment") == "per_example"
    params = make_params(13)
    opt = cls(param_groups(params, cls), **kwargs)
    for t in range(3):
        set_grads(params, t, per_example)
        opt.step()
    set_grads(params, 3, per_example)
    params[3].grad[0] = bad
    before = [p.detach().clone() for p in params]
    state_before = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state_tensors(opt).items()
    }
    where = r"param group 1, parameter 1 \(shape \(1,\)\)"
    with pytest.raises(NonFiniteGradientError, match=where):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    for k, v in state_tensors(opt).items():
        assert (
            torch.equal(v, state_before[k])
            if isinstance(v, torch.Tensor)
            else (v == state_before[k])
        )


@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_nonfinite_skip_leaves_everything_untouched(name, cls, kwargs):
    per_example = kwargs.get("second_moment") == "per_example"
    params = make_params(14)
    opt = cls(params, nonfinite="skip", **kwargs)
    set_grads(params, 0, per_example)
    opt.step()
    set_grads(params, 1, per_example)
    params[0].grad[1, 1] = float("nan")
    before = [p.detach().clone() for p in params]
    state_before = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state_tensors(opt).items()
    }
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    for k, v in state_tensors(opt).items():
        assert (
            torch.equal(v, state_before[k])
            if isinstance(v, torch.Tensor)
            else (v == state_before[k])
        )


def test_nonfinite_second_moment_is_caught():
    params = make_params(15)
    opt = sgdlab.Adam(params, second_moment="per_example")
    set_grads(params, 0, per_example=True)
    params[4].grad_second_moment[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteGradientError, match="grad_second_moment"):
        opt.step()


def test_missing_second_moment_is_a_clear_error_before_any_change():
    params = make_params(16)
    opt = sgdlab.RMSProp(
        [{"params": params[:2]}, {"params": params[2:]}], second_moment="per_example"
    )
    set_grads(params, 0, per_example=True)
    del params[3].grad_second_moment
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"grad_second_moment.*sgdlab\.stats\.track"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


BAD = [
    (sgdlab.SGD, dict(lr=-0.1), r"lr must be finite and >= 0, got -0\.1"),
    (sgdlab.SGD, dict(lr=float("nan")), r"lr must be a finite real number, got nan"),
    (sgdlab.SGD, dict(momentum=1.0), r"momentum must satisfy 0 <= momentum < 1, got 1\.0"),
    (sgdlab.SGD, dict(nesterov=True), r"nesterov=True requires momentum > 0"),
    (sgdlab.SGD, dict(weight_decay=-1), r"weight_decay must be finite and >= 0, got -1"),
    (sgdlab.SGD, dict(scaling="quadratic"), r"scaling must be one of .*'lecture'.*'quadratic'"),
    (sgdlab.SGD, dict(batch_size=0), r"batch_size must be an integer >= 1, got 0"),
    (sgdlab.SGD, dict(ref_batch_size=2.5), r"ref_batch_size must be an integer >= 1, got 2\.5"),
    (sgdlab.SGD, dict(nonfinite="warn"), r"nonfinite must be one of .*'skip'.*got 'warn'"),
    (sgdlab.RMSProp, dict(alpha=1.2), r"alpha must satisfy 0 <= alpha < 1, got 1\.2"),
    (sgdlab.RMSProp, dict(eps=-1e-8), r"eps must be finite and >= 0"),
    (sgdlab.RMSProp, dict(power=2), r"power must be a number in \(0, 1\].*got 2"),
    (sgdlab.RMSProp, dict(eps_placement="middle"), r"eps_placement must be one of .*'middle'"),
    (sgdlab.RMSProp, dict(second_moment="exact"), r"second_moment must be one of .*'exact'"),
    (sgdlab.Adam, dict(betas=(0.9, 1.0)), r"betas\[1\] must satisfy 0 <= beta < 1, got 1\.0"),
    (sgdlab.Adam, dict(betas=0.9), r"betas must be a pair"),
    (sgdlab.Adam, dict(bias_correction="kingma"), r"bias_correction must be one of .*'kingma'"),
    (sgdlab.Adam, dict(lr=float("inf")), r"lr must be a finite real number, got inf"),
    (sgdlab.SGD, dict(lr="0.1"), r"lr must be a finite real number, got '0\.1'"),
    (sgdlab.Adam, dict(eps=True), r"eps must be a finite real number, got True"),
]


@pytest.mark.parametrize("cls,kwargs,pattern", BAD)
def test_bad_hyperparameters_raise_at_construction(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_param_group_is_rejected():
    opt = sgdlab.Adam([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"betas\[0\] must satisfy"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "betas": (-0.1, 0.9)})


def test_set_batch_size_validates():
    opt = sgdlab.SGD([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got -3"):
        opt.set_batch_size(-3)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (sgdlab.SGD, torch.optim.SGD),
        (sgdlab.RMSProp, torch.optim.RMSprop),
        (sgdlab.Adam, torch.optim.Adam),
    ],
)
def test_every_torch_keyword_is_accepted_at_its_default(ours, theirs):
    """Drop-in: a call that spells out every argument of the torch namesake at its default
    (read from torch's own signature) constructs the sgdlab optimizer; ``differentiable``,
    which sgdlab does not implement, refuses True with a message naming it."""
    import inspect

    sig = inspect.signature(theirs.__init__)
    kwargs = {
        n: p.default
        for n, p in sig.parameters.items()
        if n not in ("self", "params") and p.default is not inspect.Parameter.empty
    }
    w = torch.nn.Parameter(torch.ones(3))
    opt = ours([w], **kwargs)
    assert opt.param_groups[0]["lr"] == kwargs["lr"]
    with pytest.raises(ValueError, match="differentiable must be False"):
        ours([w], **{**kwargs, "differentiable": True})
    if "capturable" in kwargs:  # implemented: the fused path with device-side counters
        assert ours([w], **{**kwargs, "capturable": True}).param_groups[0]["capturable"]


def test_numpy_integers_are_batch_sizes():
    """A batch size from numpy (np.arange, a config array) is an integer: it was refused with
    a message saying it was not one."""
    import numpy as np

    from sgdlab import dynamics

    params = make_params(0)
    opt = sgdlab.SGD(
        params, lr=0.1, momentum=0.9, ref_batch_size=np.int64(8), batch_size=np.int32(16)
    )
    set_grads(params, 0)
    opt.step(batch_size=np.int64(32))
    assert opt.param_groups[0]["batch_size"] == 32
    assert type(opt.param_groups[0]["batch_size"]) is int
    assert dynamics.excess_loss(1.0, 1.0, 0.1, np.int64(4)) == dynamics.excess_loss(
        1.0, 1.0, 0.1, 4
    )


def _stepped(cls, seed=20, steps=3, **kwargs):
    """An optimizer of ``cls`` over make_params(seed) after ``steps`` steps."""
    params = make_params(seed)
    opt = cls(params, **kwargs)
    for t in range(steps):
        set_grads(params, t, per_example=kwargs.get("second_moment") == "per_example")
        opt.step()
    return params, opt


BAD_LOADED_GROUP = [
    (sgdlab.SGD, {"lr": float("nan")}, r"lr must be a finite real number, got nan"),
    (sgdlab.SGD, {"momentum": 1.5}, r"momentum must satisfy 0 <= momentum < 1, got 1\.5"),
    (sgdlab.SGD, {"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
    (sgdlab.RMSProp, {"alpha": 1.5}, r"alpha must satisfy 0 <= alpha < 1, got 1\.5"),
    (sgdlab.RMSProp, {"momentum": 1.5}, r"momentum must satisfy 0 <= momentum < 1, got 1\.5"),
    (sgdlab.Adam, {"betas": (0.9, 1.5)}, r"betas\[1\] must satisfy 0 <= beta < 1, got 1\.5"),
    (sgdlab.Adam, {"scaling": "cubic"}, r"scaling must be one of .*got 'cubic'"),
    (sgdlab.Adam, {"foreach": "yes"}, r"foreach must be None, True or False, got 'yes'"),
    (sgdlab.Adam, {"differentiable": True}, r"differentiable must be False"),
]


@pytest.mark.parametrize("cls,change,pattern", BAD_LOADED_GROUP)
def test_load_state_dict_checks_groups_as_the_constructor_before_any_change(cls, change, pattern):
    """A loaded group passes the constructor's checks; a bad one (which used to be adopted,
    then gave NaN parameters) raises and leaves the optimizer as it was."""
    params, opt = _stepped(cls)
    before = checkpoint(opt.state_dict())
    bad = checkpoint(opt.state_dict())
    bad["param_groups"][0].update(change)
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(bad)
    assert same_structure(opt.state_dict(), before)


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("exp_avg", torch.ones(7, dtype=torch.float64), r"exp_avg is \(7,\).*is \(5, 3\)"),
        ("exp_avg_sq", 0.5, r"exp_avg_sq must be a tensor like its parameter, got float"),
        ("step", torch.ones(2), r"step must be one finite count >= 0"),
        ("step", float("nan"), r"step must be a finite real number, got nan"),
    ],
)
def test_load_state_dict_checks_each_state_entry_before_any_change(key, value, pattern):
    """A (7,) exp_avg for a (5, 3) parameter was adopted and the next step updated the
    parameters before it failed: now the load raises and nothing changes."""
    params, opt = _stepped(sgdlab.Adam)
    before = checkpoint(opt.state_dict())
    bad = checkpoint(opt.state_dict())
    bad["state"][0][key] = value
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(bad)
    assert same_structure(opt.state_dict(), before)


@pytest.mark.parametrize(
    "source,target",
    [
        (dict(cls=sgdlab.SGD, momentum=0.9), sgdlab.Adam),
        (dict(cls=sgdlab.SGD), sgdlab.Adam),
        (dict(cls=sgdlab.RMSProp), sgdlab.Adam),
        (dict(cls=sgdlab.Adam), sgdlab.RMSProp),
        (dict(cls=sgdlab.SGD, momentum=0.9), sgdlab.RMSProp),
        (dict(cls=sgdlab.Adam), sgdlab.SGD),
        (dict(cls=torch.optim.SGD, lr=0.1, momentum=0.9), sgdlab.Adam),
        (dict(cls=torch.optim.Adam), sgdlab.RMSProp),
    ],
    ids=lambda x: (
        x["cls"].__module__.split(".")[0] + "." + x["cls"].__name__
        if isinstance(x, dict)
        else x.__name__
    ),
)
def test_a_state_of_another_optimizer_class_is_refused(source, target):
    """Such a state was adopted with its moments silently dropped (an SGD state in Adam
    restarted Adam from step 0); torch.optim raises a KeyError for it (at the load or at the
    first step). sgdlab refuses it at the load, before any change."""
    source = dict(source)
    _, other = _stepped(source.pop("cls"), seed=21, **source)
    params, opt = _stepped(target)
    before = checkpoint(opt.state_dict())
    with pytest.raises(ValueError, match=r"another optimizer|not a state dict of"):
        opt.load_state_dict(checkpoint(other.state_dict()))
    assert same_structure(opt.state_dict(), before)


def test_torch_adam_amsgrad_state_loads_as_torch_does():
    """As torch.optim, the saved options replace the constructor's: a torch.optim.Adam
    checkpoint with amsgrad=True loaded into sgdlab.Adam() continues with amsgrad, exactly as
    the torch optimizer itself (float64)."""
    theirs_params, theirs = _stepped(torch.optim.Adam, lr=0.01, amsgrad=True)
    ours_params = [p.detach().clone().requires_grad_() for p in theirs_params]
    ours = sgdlab.Adam(ours_params, lr=0.01, foreach=False)
    ours.load_state_dict(checkpoint(theirs.state_dict()))
    assert ours.param_groups[0]["amsgrad"] is True
    for t in range(3, 9):
        set_grads(theirs_params, t)
        set_grads(ours_params, t)
        theirs.step()
        ours.step()
    for a, b in zip(theirs_params, ours_params):
        assert torch.max(torch.abs(a - b)).item() <= 1e-15


def test_a_refused_param_group_is_not_added():
    """add_param_group checked the group after appending it: the refused group stayed."""
    opt = sgdlab.Adam([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"lr must be finite and >= 0, got -1"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": -1})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "ours,theirs,kwargs",
    [
        (sgdlab.Adam, torch.optim.Adam, dict(lr=0.01)),
        (sgdlab.RMSProp, torch.optim.RMSprop, dict(lr=0.01, momentum=0.5)),
    ],
    ids=["Adam", "RMSProp"],
)
def test_a_float_step_of_an_older_checkpoint_is_converted_as_torch_does(ours, theirs, kwargs):
    """Older torch checkpoints keep ``step`` as a Python number: Adam crashed on it and
    RMSProp kept a float. torch.optim's __setstate__ makes it a tensor; so does sgdlab, and
    the run continues as the uninterrupted one (float64)."""
    params, opt = _stepped(ours, **kwargs)
    saved = checkpoint(opt.state_dict())
    for st in saved["state"].values():
        st["step"] = float(st["step"].item())
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt2 = ours(resumed, **kwargs)
    opt2.load_state_dict(saved)
    torch_params = [p.detach().clone().requires_grad_() for p in params]
    twin = theirs(torch_params, **kwargs)
    twin.load_state_dict(checkpoint(saved))
    for p in resumed:
        step, torch_step = opt2.state[p]["step"], twin.state[torch_params[0]]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch_step.dtype
        assert step.item() == 3.0
    for t in range(3, 7):
        set_grads(params, t)
        set_grads(resumed, t)
        opt.step()
        opt2.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_keep_the_nonfinite_policy(copy_with):
    """A copy reset nonfinite to "raise" (and skipped_steps to 0): a copied optimizer then
    raised on the inf gradient the original skips."""
    import copy
    import pickle

    params = make_params(22)
    opt = sgdlab.Adam(params, nonfinite="skip")
    set_grads(params, 0)
    params[0].grad[0, 0] = float("inf")
    opt.step()
    if copy_with == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    assert (opt2.nonfinite, opt2.skipped_steps) == ("skip", 1)
    set_grads(params2, 1)
    params2[0].grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in params2]
    opt2.step()  # skipped, not raised
    assert opt2.skipped_steps == 2
    assert all(torch.equal(p, b) for p, b in zip(params2, before))


@pytest.mark.parametrize("name,cls,kwargs", CASES, ids=[c[0] for c in CASES])
def test_state_dict_round_trips_through_load_state_dict(name, cls, kwargs):
    """load_state_dict added a "differentiable" key to every group, so a reloaded state dict
    never equalled the one loaded; now it is the same structure, also after a second load."""
    params, opt = _stepped(cls, **kwargs)
    saved = opt.state_dict()
    opt2 = cls([p.detach().clone().requires_grad_() for p in params], **kwargs)
    opt2.load_state_dict(checkpoint(saved))
    assert same_structure(opt2.state_dict(), saved)
    opt2.load_state_dict(checkpoint(saved))
    assert same_structure(opt2.state_dict(), saved)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (sgdlab.SGD, torch.optim.SGD),
        (sgdlab.RMSProp, torch.optim.RMSprop),
        (sgdlab.Adam, torch.optim.Adam),
    ],
)
def test_positional_arguments_follow_torch(ours, theirs):
    """RMSProp took capturable, foreach, maximize and differentiable by keyword only, where
    torch.optim.RMSprop takes them by position: a positional call is a drop-in for each."""
    import inspect

    def positional(cls):
        sig = inspect.signature(cls.__init__)
        return [
            (n, p.default)
            for n, p in sig.parameters.items()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and n != "self"
        ]

    assert positional(ours) == positional(theirs)
    if ours is sgdlab.RMSProp:
        w = torch.nn.Parameter(torch.ones(3))
        opt = ours([w], 0.01, 0.99, 1e-8, 0, 0, False, False, None, True, False)
        assert opt.param_groups[0]["maximize"] is True
