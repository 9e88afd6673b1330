"""Every ``python`` code block of docs/stats.md runs (in order, each in a fresh namespace) and
its printed output matches the page's claims where it states them."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "stats.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_code():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_code_block_runs(i):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(BLOCKS[i], f"docs/stats.md block {i}", "exec"), {"__name__": "docs"})
    text = out.getvalue()
    code = BLOCKS[i]
    if i == 0:
        assert "torch.Size([32, 8])" in text
    if "register_rule" in code:  # the Gate's statistic: four entries
        assert text.startswith("tensor([") and text.count(",") == 3
    if "replace_batchnorm" in code:
        assert text.startswith("GroupNorm(8, 16") and "torch.Size([16])" in text
    if "checkpoint(" in code:
        assert "torch.Size([16, 16])" in text
