"""``import sgdlab`` leaves torch.compile's machinery (dynamo, inductor, sympy: about a second
on top of torch's own import) unloaded until a fused step first needs it.

Each check runs in a fresh interpreter, since this one has imported everything already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch._dynamo", "torch._inductor", "sympy")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["sgdlab", "sgdlab.stats", "sgdlab.optim", "sgdlab.distributed"])
def test_import_leaves_dynamo_inductor_and_sympy_unloaded(module):
    """The fused step's ``@torch._dynamo.disable`` imported dynamo (and with it inductor and
    sympy) with ``sgdlab.optim``."""
    loaded = _run(
        f"import sys, json, {module}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert loaded == []


def test_fused_step_loads_them_when_it_runs_and_equals_torch_optim():
    """After the lazy import the fused SGD step (compiled kernel) still runs, loads dynamo on
    its first call, and matches ``torch.optim.SGD`` in float64."""
    code = """
import sys, json, torch, sgdlab
from sgdlab.optim import _fast
_fast.set_compile(True)
before = [m for m in HEAVY if m in sys.modules]
torch.manual_seed(0)
w = torch.randn(5, 3, dtype=torch.float64)
a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
ours = sgdlab.SGD([a], lr=0.1, momentum=0.9, fused=True)
ref = torch.optim.SGD([b], lr=0.1, momentum=0.9)
for t in range(3):
    g = torch.randn(5, 3, dtype=torch.float64)
    a.grad, b.grad = g.clone(), g.clone()
    ours.step()
    ref.step()
print(json.dumps({"before": before, "dynamo": "torch._dynamo" in sys.modules,
                  "compiled": bool(_fast.COMPILE_SECONDS), "error": (a - b).abs().max().item(),
                  "cached": bool(ours._fused)}))
"""
    got = _run(f"HEAVY = {HEAVY!r}\n" + code)
    assert got["before"] == []
    assert got["dynamo"] and got["compiled"] and got["cached"]
    assert got["error"] <= 1e-12
