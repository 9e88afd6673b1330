"""sgdlab's SGD, RMSProp and Adam over torch's own optimizer test database.

``torch.testing._internal.common_optimizers.optim_db`` lists, per torch optimizer, the
configurations torch tests it with (``optim_inputs_func``) and the inputs it must refuse
(``optim_error_inputs_func``). Each configuration runs here on every sgdlab path (reference,
foreach, fused, capturable where the configuration allows) against torch.optim with the same
configuration: the same parameters after a few steps of a small model with deterministic
gradients, and the same state dict. The properties of torch's test/test_optim.py that apply to
a drop-in (lr = 0, closures, steps without gradients, resume, param groups, maximize) follow.

Configurations that fail because of known defects are listed in ONE table, ``KNOWN``, as
strict xfails: they turn into failures once fixed, and the table is then emptied.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.nn import Parameter

import sgdlab

from .cases import checkpoint, same_structure

OURS = {"SGD": sgdlab.SGD, "RMSprop": sgdlab.RMSProp, "Adam": sgdlab.Adam}
THEIRS = {"SGD": torch.optim.SGD, "RMSprop": torch.optim.RMSprop, "Adam": torch.optim.Adam}
PATH_KWARGS = {
    "reference": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "capturable": {"capturable": True},
}
#: the options that choose a path (torch's twin always runs its for-loop path)
PATH_KEYS = ("foreach", "fused", "capturable", "differentiable")
STEPS = 6


# ---------------------------------------------------------------------------- the database
def _load_db() -> dict[str, tuple[Any, Any]]:
    """``{torch name: (optim_inputs_func, optim_error_inputs_func)}`` from torch's optim_db
    (its import needs ``expecttest``, in the test extra)."""
    from torch.testing._internal.common_optimizers import optim_db

    return {
        info.optim_cls.__name__: (info.optim_inputs_func, info.optim_error_inputs_func)
        for info in optim_db
        if info.optim_cls.__name__ in OURS
    }


DB = _load_db()


def _configs() -> list[tuple[str, str, dict[str, Any]]]:
    """(torch name, description, kwargs) of every configuration torch tests on the CPU, and
    those it tests on CUDA only (capturable, tensor lr), which sgdlab runs on the CPU too."""
    out = []
    for name, (inputs, _) in DB.items():
        seen = set()
        for device in ("cpu", "cuda"):
            for inp in inputs(device=device, dtype=torch.float64):
                if inp.desc not in seen:
                    seen.add(inp.desc)
                    out.append((name, inp.desc, inp.kwargs))
    return out


CONFIGS = _configs()

#: Configurations that fail because of defects being fixed elsewhere (issue 17), as
#: (torch name, description, path, dtype) -> reason, None matching any path or dtype. Strict:
#: a fix turns the xfail into a failure, and its entry is then removed.
KNOWN: dict[tuple[str, str, str | None, torch.dtype | None], str] = {}

#: Deliberate differences, pinned: torch computes Adam's step size and debiasing in the
#: dtype of a float32 tensor lr or betas; sgdlab reads such a tensor as a number and computes
#: in float64 (README, "Differences from torch.optim"). On float64 parameters the two are
#: then float32 rounding apart (4e-9 relative after 6 steps), not 1e-12.
FLOAT32_TENSOR_HYPER = {
    ("Adam", "Tensor lr with capturable and amsgrad"),
    ("Adam", "Tensor lr, Tensor betas, with capturable and amsgrad"),
    ("Adam", "Tensor lr, Tensor betas, with capturable"),
}


def _known(name: str, desc: str, path: str | None = None, dtype: Any = None) -> list[Any]:
    """The strict xfail mark of a known failure, if any."""
    for key in (
        (name, desc, path, dtype),
        (name, desc, path, None),
        (name, desc, None, dtype),
        (name, desc, None, None),
    ):
        if key in KNOWN:
            return [pytest.mark.xfail(strict=True, reason=KNOWN[key])]
    return []


def _cases() -> list[Any]:
    cases = []
    for name, desc, kwargs in CONFIGS:
        paths = ["capturable"] if kwargs.get("capturable") else list(PATH_KWARGS)
        if name == "SGD":
            paths = [p for p in paths if p != "capturable"]
        for path in paths:
            for dtype in (torch.float64, torch.float32):
                tag = f"{name}-{desc}-{path}-{str(dtype).split('.')[-1]}".replace(" ", "_")
                cases.append(
                    pytest.param(
                        name,
                        desc,
                        kwargs,
                        path,
                        dtype,
                        id=tag,
                        marks=_known(name, desc, path, dtype),
                    )
                )
    return cases


# ---------------------------------------------------------------------------- the model
def _model(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """A two-layer tanh network's parameters."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (4,), (2, 4), (2,)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _set_grads(params: list[torch.Tensor], t: int) -> torch.Tensor:
    """The gradients of a mean squared error on batch ``t`` (fixed data): deterministic."""
    g = torch.Generator().manual_seed(100 + t)
    dtype = params[0].dtype
    x = torch.randn(6, 3, generator=g, dtype=dtype)
    y = torch.randn(6, 2, generator=g, dtype=dtype)
    w1, b1, w2, b2 = params
    for p in params:
        p.grad = None
    with torch.enable_grad():
        loss = ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()
        loss.backward()
    return loss.detach()


def _twins(name, kwargs, path, dtype, seed=0):
    """The sgdlab optimizer on ``path`` and the torch.optim one, same configuration and
    same starting parameters."""
    ours_p, theirs_p = _model(dtype, seed), _model(dtype, seed)
    ours_kwargs = {k: v for k, v in copy.deepcopy(kwargs).items() if k not in PATH_KEYS}
    ours_kwargs.update(PATH_KWARGS[path])
    theirs_kwargs = {k: v for k, v in copy.deepcopy(kwargs).items() if k not in PATH_KEYS}
    theirs_kwargs["foreach"] = False
    return (
        ours_p,
        OURS[name](ours_p, **ours_kwargs),
        theirs_p,
        THEIRS[name](theirs_p, **theirs_kwargs),
    )


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    )


def _close(a: Any, b: Any, dtype: torch.dtype) -> None:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a = torch.as_tensor(a, dtype=torch.float64)
        b = torch.as_tensor(b, dtype=torch.float64)
        torch.testing.assert_close(a, b, **_tol(dtype))
    else:
        assert a == b


def _assert_same_state(ours, theirs, dtype) -> None:
    """Every entry torch keeps, sgdlab keeps with the same value (sgdlab may keep its
    debiasing products besides); every option of torch's groups has torch's value."""
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours["state"].keys() == sd_theirs["state"].keys()
    for pid, st in sd_theirs["state"].items():
        extra = set(sd_ours["state"][pid]) - set(st)
        assert extra <= {"beta1_prod", "beta2_prod"}, extra
        for key, value in st.items():
            _close(sd_ours["state"][pid][key], value, dtype)
    for g_ours, g_theirs in zip(sd_ours["param_groups"], sd_theirs["param_groups"]):
        for key, value in g_theirs.items():
            if key not in PATH_KEYS:
                _close(g_ours[key], value, dtype)


@pytest.fixture(autouse=True)
def _eager(eager_kernels):
    """Fused-path kernels run eagerly (test_fast_compile checks compiled == eager)."""


@pytest.mark.parametrize("name,desc,kwargs,path,dtype", _cases())
def test_optim_db_config_matches_torch(name, desc, kwargs, path, dtype):
    ours_p, ours, theirs_p, theirs = _twins(name, kwargs, path, dtype)
    for t in range(STEPS):
        _set_grads(ours_p, t)
        _set_grads(theirs_p, t)
        ours.step()
        theirs.step()
    tol = _tol(dtype)
    if (name, desc) in FLOAT32_TENSOR_HYPER and dtype == torch.float64:
        tol = {"atol": 1e-8, "rtol": 1e-8}
    for a, b in zip(ours_p, theirs_p):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
    if tol is _tol(dtype):
        _assert_same_state(ours, theirs, dtype)


# ---------------------------------------------------------------------------- error inputs
def _error_cases() -> list[Any]:
    cases = []
    for name, (_, error_inputs) in DB.items():
        for err in error_inputs(device="cpu", dtype=torch.float64):
            inp = err.optimizer_error_input
            tag = f"{name}-{inp.desc}".replace(" ", "_")
            cases.append(pytest.param(name, err, id=tag, marks=_known(name, inp.desc)))
    return cases


@pytest.mark.parametrize("name,err", _error_cases())
def test_optim_db_error_inputs_are_refused(name, err):
    """sgdlab refuses what torch refuses (the same error type; the message may differ), at
    construction or at the step as torch does."""
    inp = err.optimizer_error_input
    params = inp.params
    if params is None:
        params = [Parameter(torch.randn(1, dtype=torch.float64))]
    if issubclass(err.error_type, Warning):
        with pytest.warns(err.error_type):
            OURS[name](params, **inp.kwargs)
        return
    if err.error_on.name == "CONSTRUCTION_ERROR":
        with pytest.raises(err.error_type):
            OURS[name](params, **inp.kwargs)
        return
    opt = OURS[name](params, **inp.kwargs)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.rand_like(p)
    with pytest.raises(err.error_type):
        opt.step()


# ---------------------------------------------------------------------------- test_optim.py
ALL_PATHS = [
    pytest.param(name, path, id=f"{name}-{path}")
    for name in OURS
    for path in PATH_KWARGS
    if not (name == "SGD" and path == "capturable")
]
#: options under which every optimizer moves (momentum etc. where it has them)
RICH = {
    "SGD": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.01),
}


def _ours(name, params, path, **kwargs):
    return OURS[name](params, **{**RICH[name], **kwargs, **PATH_KWARGS[path]})


@pytest.mark.parametrize("name,path", ALL_PATHS)
def test_lr_zero_is_a_no_op(name, path):
    params = _model(torch.float64)
    before = [p.detach().clone() for p in params]
    opt = _ours(name, params, path, lr=0.0)
    for t in range(3):
        _set_grads(params, t)
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("name", list(OURS))
def test_closure_is_called_once_and_its_loss_returned(name):
    params = _model(torch.float64)
    opt = OURS[name](params, **RICH[name])
    calls = []

    def closure():
        calls.append(1)
        return _set_grads(params, 0)

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.equal(loss, _set_grads(_model(torch.float64), 0))


@pytest.mark.parametrize("name,path", ALL_PATHS)
def test_step_without_gradients_is_a_no_op(name, path):
    params = _model(torch.float64)
    before = [p.detach().clone() for p in params]
    opt = _ours(name, params, path)
    opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert opt.state_dict()["state"] == {}


@pytest.mark.parametrize("name,path", ALL_PATHS)
def test_resume_continues_as_uninterrupted_and_moves_to_torch(name, path):
    """A state dict round trip then more steps equals the uninterrupted run; the same
    state dict loaded into torch.optim continues as sgdlab does (float64)."""
    params = _model(torch.float64)
    opt = _ours(name, params, path)
    for t in range(3):
        _set_grads(params, t)
        opt.step()
    saved = checkpoint({"params": [p.detach() for p in params], "opt": opt.state_dict()})
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = _ours(name, resumed, path)
    opt2.load_state_dict(saved["opt"])
    assert same_structure(opt2.state_dict(), saved["opt"])
    in_torch = [p.clone().requires_grad_() for p in saved["params"]]
    twin = THEIRS[name](in_torch, **RICH[name], foreach=False)
    sd = checkpoint(saved["opt"])
    for group in sd["param_groups"]:
        group.update(foreach=False, fused=None, capturable=False)
    twin.load_state_dict(sd)
    for t in range(3, 6):
        for ps, o in ((params, opt), (resumed, opt2), (in_torch, twin)):
            _set_grads(ps, t)
            o.step()
    for a, b, c in zip(params, resumed, in_torch):
        assert torch.equal(a, b)
        torch.testing.assert_close(c.detach(), a.detach(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name,path", ALL_PATHS)
def test_param_groups_with_their_own_options_match_torch(name, path):
    """test_optim's param-group tests: a group with its own lr, weight decay and maximize."""
    extra = {"lr": 0.003, "weight_decay": 0.1, "maximize": True}
    ours_p, theirs_p = _model(torch.float64), _model(torch.float64)
    ours = _ours(name, [{"params": ours_p[:2]}, {"params": ours_p[2:], **extra}], path)
    theirs = THEIRS[name](
        [{"params": theirs_p[:2]}, {"params": theirs_p[2:], **extra}], **RICH[name], foreach=False
    )
    for t in range(STEPS):
        for ps, o in ((ours_p, ours), (theirs_p, theirs)):
            _set_grads(ps, t)
            o.step()
    for a, b in zip(ours_p, theirs_p):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("name,path", ALL_PATHS)
def test_steps_go_the_right_direction(name, path, maximize):
    """test_optim's test_forloop_goes_right_direction: a convex loss falls (rises when
    maximizing)."""
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = _ours(name, [w], path, maximize=maximize, weight_decay=0.0)
    losses = []
    for _ in range(5):
        w.grad = None
        loss = (w**2).sum()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    final = (w.detach() ** 2).sum().item()
    assert final > losses[0] if maximize else final < losses[0]


@pytest.mark.parametrize("name", list(OURS))
def test_deepcopy_copies_all_public_attributes(name):
    """test_optim's test_deepcopy_copies_all_public_attrs (sgdlab's nonfinite included)."""
    params = _model(torch.float64)
    opt = OURS[name](params, **RICH[name], nonfinite="skip")
    _set_grads(params, 0)
    opt.step()
    copied = copy.deepcopy(opt)
    public = {k for k in opt.__dict__ if not k.startswith("_")}
    assert public == {k for k in copied.__dict__ if not k.startswith("_")}
    for key in public - {"state", "param_groups"}:
        assert same_structure(getattr(copied, key), getattr(opt, key)), key
    assert same_structure(pickle.loads(pickle.dumps(opt)).state_dict(), opt.state_dict())


@pytest.mark.parametrize("name", list(OURS))
def test_differentiable_true_is_refused_where_torch_accepts_it(name):
    """A deliberate difference (documented in the optimizers' docstrings): autograd through
    the step is not implemented, so differentiable=True raises instead of being ignored."""
    w = Parameter(torch.ones(2))
    THEIRS[name]([w], differentiable=True)
    with pytest.raises(ValueError, match="differentiable must be False"):
        OURS[name]([w], differentiable=True)


def test_nonfinite_gradient_raises_where_torch_steps():
    """A deliberate difference (nonfinite="raise" by default): torch.optim writes NaN into
    the parameters; sgdlab raises before any change (nonfinite="ignore" is torch's way)."""
    for cls in (torch.optim.Adam, sgdlab.Adam):
        w = Parameter(torch.ones(2))
        w.grad = torch.tensor([float("nan"), 1.0])
        if cls is torch.optim.Adam:
            cls([w]).step()
            assert torch.isnan(w).any()
        else:
            with pytest.raises(sgdlab.optim.NonFiniteGradientError):
                cls([w]).step()
            assert torch.equal(w.detach(), torch.ones(2))


# ------------------------------------------------- inputs torch accepts (known defects: KNOWN)
def _prop(test: str, name: str, path: str | None = None) -> Any:
    tag = f"{name}-{path}" if path else name
    return pytest.param(name, path, id=tag, marks=_known(name, test, path))


def _all_paths(test: str) -> list[Any]:
    return [
        _prop(test, name, path)
        for name in OURS
        for path in PATH_KWARGS
        if not (name == "SGD" and path == "capturable")
    ]


def _run_both(name, path, ours_p, theirs_p, grads, steps=3, **kwargs):
    ours = _ours(name, ours_p, path, **kwargs)
    theirs = THEIRS[name](theirs_p, **{**RICH[name], **kwargs}, foreach=False)
    for _ in range(steps):
        for ps, o in ((ours_p, ours), (theirs_p, theirs)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
    for a, b in zip(ours_p, theirs_p):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name,path", _all_paths("complex parameters"))
def test_complex_parameters_match_torch(name, path):
    """test_optim's test_complex: torch optimizes a complex tensor as its real view."""
    g = torch.Generator().manual_seed(3)
    start = torch.randn(3, 2, generator=g, dtype=torch.complex128)
    grad = torch.randn(3, 2, generator=g, dtype=torch.complex128)
    ours_p, theirs_p = [start.clone().requires_grad_()], [start.clone().requires_grad_()]
    _run_both(name, path, ours_p, theirs_p, [grad])


@pytest.mark.parametrize("name,path", _all_paths("zero-size parameter"))
def test_a_zero_size_parameter_is_stepped(name, path):
    g = torch.randn(3, 2, dtype=torch.float64)
    ours_p = [
        torch.ones(3, 2, dtype=torch.float64, requires_grad=True),
        torch.zeros(0, 4, dtype=torch.float64, requires_grad=True),
    ]
    theirs_p = [p.detach().clone().requires_grad_() for p in ours_p]
    _run_both(name, path, ours_p, theirs_p, [g, torch.zeros(0, 4, dtype=torch.float64)])


@pytest.mark.parametrize("name,path", [_prop("meta parameters", n) for n in OURS])
def test_meta_parameters_are_stepped(name, path):
    """torch.optim steps meta tensors (shape dry runs)."""
    w = torch.empty(3, 2, device="meta", requires_grad=True)
    w.grad = torch.empty(3, 2, device="meta")
    _ours(name, [w], "reference").step()


@pytest.mark.parametrize("name,path", [_prop("numpy hyperparameters", n) for n in OURS])
def test_numpy_scalar_hyperparameters_are_accepted(name, path):
    import numpy as np

    kwargs = {k: np.float32(v) if isinstance(v, float) else v for k, v in RICH[name].items()}
    if name == "Adam":
        # torch refuses np.float32 betas (not floats, not tensors); np.float64 is a float
        kwargs["betas"] = (np.float64(0.9), np.float64(0.99))
    THEIRS[name]([Parameter(torch.ones(2))], **kwargs)
    OURS[name]([Parameter(torch.ones(2))], **kwargs)


@pytest.mark.parametrize(
    "name,path", [_prop("dense then sparse group", n) for n in ("RMSprop", "Adam")]
)
def test_a_sparse_group_is_refused_before_the_dense_one_moves(name, path):
    dense = Parameter(torch.ones(3, dtype=torch.float64))
    sparse = Parameter(torch.ones(4, 2, dtype=torch.float64))
    dense.grad = torch.ones(3, dtype=torch.float64)
    sparse.grad = torch.sparse_coo_tensor([[0]], torch.ones(1, 2, dtype=torch.float64), (4, 2))
    opt = OURS[name]([{"params": [dense]}, {"params": [sparse]}])
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(dense.detach(), torch.ones(3, dtype=torch.float64))
    assert opt.state_dict()["state"] == {}


@pytest.mark.parametrize(
    "name,path", [_prop("momentum-cycling scheduler", "Adam", p) for p in PATH_KWARGS]
)
def test_adam_under_one_cycle_lr_matches_torch(name, path):
    ours_p, theirs_p = _model(torch.float64), _model(torch.float64)
    ours = _ours(name, ours_p, path)
    theirs = THEIRS[name](theirs_p, **RICH[name], foreach=False)
    scheds = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS)
        for o in (ours, theirs)
    ]
    for t in range(STEPS):
        for ps, o, s in zip((ours_p, theirs_p), (ours, theirs), scheds):
            _set_grads(ps, t)
            o.step()
            s.step()
    for a, b in zip(ours_p, theirs_p):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=1e-12)
