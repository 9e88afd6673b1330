"""No import circles in the parts of sgdlab that have been untangled.

The graph is read from the source with ``ast``: every ``import x`` and ``from x import y``
statement of every module of ``src/sgdlab``, including those inside functions (a deferred
import still ties two modules together), resolved to sgdlab modules (``from pkg import mod``
counts as an edge to ``pkg.mod`` when that is a module). A circle whose modules all lie in one
of :data:`SCOPES` fails the test; the failure message lists every circle in the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: module prefixes that must be free of circles (a list that grows as areas are untangled)
SCOPES = [
    "sgdlab.optim",
    "sgdlab.hyper",
    "sgdlab.averages",
    "sgdlab.schedules",
    "sgdlab.stats",
    "sgdlab.dynamics",
    "sgdlab.distributed",
    "sgdlab.integrations",
    "sgdlab.lab",
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "sgdlab").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the sgdlab modules it imports (anywhere in its body)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]  # fmt: skip
            for target in targets:
                while target and target not in modules:  # `import a.b.c` -> nearest module
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _in_scope(module: str) -> bool:
    return any(module == s or module.startswith(s + ".") for s in SCOPES)


def test_the_graph_sees_deferred_and_relative_imports():
    """The reader is an oracle only if it sees what it must: a known edge of each kind."""
    graph = import_graph()
    assert "sgdlab.optim._common" in graph["sgdlab.optim.adam"]  # from-import of a module
    assert "sgdlab.optim._fast.kernel" in graph["sgdlab.optim._fast"]  # package __init__
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(toy) == [["a", "b", "c"]]


def test_no_import_circles_in_scope():
    found = circles(import_graph())
    bad = [c for c in found if any(_in_scope(m) for m in c)]
    listing = "\n".join(" <-> ".join(c) for c in found) or "(none)"
    assert not bad, f"import circles touching {SCOPES}; all circles in sgdlab:\n{listing}"
