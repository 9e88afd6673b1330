"""Issue 18: no import circles among the lab's modules (runner <-> report was one)."""

from __future__ import annotations

import ast
from pathlib import Path

LAB = Path(__file__).resolve().parents[2] / "src" / "sgdlab" / "lab"


def _imports(path: Path) -> set[str]:
    """The ``sgdlab.lab`` modules ``path`` imports anywhere (module level or in a function)."""
    pkg = "sgdlab.lab" + ("" if path.parent == LAB else "." + path.parent.name)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = f"{base}.{node.module}" if node.level and node.module else node.module or base
            names = [f"{mod}.{a.name}" for a in node.names] if not node.module else []
            for m in [mod, *names]:
                if m.startswith("sgdlab.lab"):
                    found.add(m)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sgdlab.lab"))
    return found


def _module(path: Path) -> str:
    rel = path.relative_to(LAB.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "sgdlab." + ".".join(parts)


def test_the_lab_has_no_import_circle() -> None:
    files = {_module(p): p for p in LAB.rglob("*.py")}
    graph = {
        m: {i for i in _imports(p) if i in files and i != m and i != "sgdlab.lab"}
        for m, p in files.items()
        if m != "sgdlab.lab"
    }
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != 1, "import circle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    # the graph is read right: the report reads results through the results module
    assert "sgdlab.lab.results" in graph["sgdlab.lab.report"]
    assert "sgdlab.lab.report" in graph["sgdlab.lab.runner"]  # (in a function)
