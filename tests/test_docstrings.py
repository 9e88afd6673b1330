"""Docstrings keep the maths, not measurements, in one style (issue 18): Google style
(``Args:``, ``Returns:``, ``Example::``), no numpydoc section underlines; benchmark figures
(``1.33x plain``, ``97 us``) live in benchmarks/README.md. src/sgdlab, lab/ and optim/_fast/
aside (their owners')."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sgdlab"
UNDERLINE = re.compile(
    r"^\s*(Parameters|Returns|Example|Examples|Raises|Notes)\s*\n\s*-{3,}\s*$", re.M
)
FIGURE = re.compile(
    r"\b\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?x (?:plain|faster|slower|cheaper)\b"
    r"|\b\d+(?:-\d+)? (?:us|ms)\b|\b(?:H100|H200|A100)\b"
)


def _docstrings() -> list[tuple[str, int, str]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(("lab/", "optim/_fast/")):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    found.append((rel, getattr(node, "lineno", 1), doc))
    return found


def test_patterns_catch_what_they_forbid():
    assert UNDERLINE.search("Summary.\n\nParameters\n----------\nx : a number")
    assert FIGURE.search("CPU 1.33x plain at 32 MiB") and FIGURE.search("170-176 us fused")
    assert not FIGURE.search("a 2x2 matrix, B x T inputs, 32 MiB chunks")


def test_no_numpydoc_sections():
    bad = [(f, line) for f, line, doc in _docstrings() if UNDERLINE.search(doc)]
    assert not bad, f"numpydoc sections (use Args:, Returns:, Example::): {bad}"


def test_no_benchmark_figures_in_docstrings():
    bad = [(f, line, FIGURE.search(doc)[0]) for f, line, doc in _docstrings() if FIGURE.search(doc)]
    assert not bad, f"measurements in docstrings (move them to benchmarks/README.md): {bad}"
