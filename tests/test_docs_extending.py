"""Every ``python`` code block of docs/extending.md runs (in order, each in a fresh namespace)
and prints what the page says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
PRINTS = ["torch.Size([4])\n", "5 2\n"]


def test_the_page_has_its_examples():
    assert len(BLOCKS) == len(PRINTS)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_code_block_runs(i):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(BLOCKS[i], f"docs/extending.md block {i}", "exec"), {"__name__": "docs"})
    assert out.getvalue() == PRINTS[i]
