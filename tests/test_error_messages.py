"""Error messages stay short (issue 18): the parameter, the value, what is allowed and the fix
in a few words. The message of an exception built in src/sgdlab (lab/ aside) counts its
literal text, plus :data:`PLACEHOLDER` characters per f-string placeholder; none may reach
:data:`LIMIT`."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sgdlab"
LIMIT = 300
PLACEHOLDER = 20  # what a formatted value typically adds


def message_length(node: ast.AST) -> int:
    """Characters of the string expression ``node`` (0 for a non-string part)."""
    if isinstance(node, ast.Constant):
        return len(node.value) if isinstance(node.value, str) else 0
    if isinstance(node, ast.JoinedStr):
        return sum(
            PLACEHOLDER if isinstance(v, ast.FormattedValue) else message_length(v)
            for v in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return message_length(node.left) + message_length(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr == "format":  # "...{}...".format(x)
            return message_length(node.func.value) + PLACEHOLDER * len(node.args)
        if node.func.attr == "join":
            return sum(message_length(a) for a in node.args)
    return 0


def _is_exception(func: ast.AST) -> bool:
    """A call that builds an exception (``ValueError(...)``, ``torch.cuda.OutOfMemoryError``),
    raised where it is or returned to be raised (``raise missing_second_moment_error(...)``)."""
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name.endswith(("Error", "Exception"))


def long_messages(root: Path = SRC) -> list[tuple[str, int, int]]:
    """``(file, line, length)`` of each exception whose message is LIMIT characters or more."""
    found = []
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        if name.startswith("lab/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _is_exception(node.func):
                n = max((message_length(a) for a in node.args), default=0)
                if n >= LIMIT:
                    found.append((name, node.lineno, n))
    return found


def test_message_length_counts_fstring_parts():
    node = ast.parse('f"lr must be >= 0, got {lr!r}" + " (or None)"', mode="eval").body
    assert message_length(node) == len("lr must be >= 0, got ") + PLACEHOLDER + len(" (or None)")


def test_no_raise_message_of_300_characters():
    found = long_messages()
    assert not found, f"raise messages of {LIMIT}+ characters (shorten them): {found}"
