"""The README's quickstart runs as written, and does what it says."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert "sgdlab reproduce --preset quick" in first_block[0]
    assert first_block[1].split("#")[0].strip() == "./scripts/test.sh"
    ci = (README.parent / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in ci


def test_quickstart_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)
    # The quickstart's numbers: the sqrt rule's lr at B = 256 from B0 = 32 ...
    printed = capsys.readouterr().out.split()
    assert math.isclose(float(printed[0]), 1e-3 * math.sqrt(8), rel_tol=1e-12)
    # ... and the conjugate constructor stepped at B = 128 with lr = B eta'.
    opt = ns["opt"]
    assert opt.batch_size == 128
    assert math.isclose(opt.effective_hyperparameters(opt.param_groups[0])["lr"], 128e-5)
    assert all(torch.isfinite(p).all() for p in ns["model"].parameters())
