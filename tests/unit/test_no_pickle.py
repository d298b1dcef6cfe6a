"""No code in data: nothing under chain/, server/ or client/ may unpickle what crossed a boundary.

Flags ``pickle`` (any module or name containing it), ``weights_only=False`` and ``allow_pickle=True``
in code; comments and docstrings are skipped and ``allow_pickle=False`` is fine.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("chain", "server", "client")
_ALLOWED = re.compile(r"allow_pickle\s*=\s*False")
_FORBIDDEN = re.compile(r"pickle|weights_only\s*=\s*False", re.IGNORECASE)


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def pickle_uses(path: Path) -> list[str]:
    """``file:line: text`` for each forbidden use in one Python file."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    skip = _docstring_lines(ast.parse(source))
    found = []
    for number, line in enumerate(lines, start=1):
        if number not in skip and _FORBIDDEN.search(_ALLOWED.sub("", line)):
            found.append(f"{path}:{number}: {line.strip()}")
    return found


def test_no_pickle_in_chain_server_client() -> None:
    files = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
    assert len(files) > 10, f"scanned only {len(files)} files under {PACKAGES}; wrong repository root?"
    found = [hit for path in files for hit in pickle_uses(path)]
    assert not found, "pickle-capable loading in shipped code:\n" + "\n".join(found)


def test_scanner_flags_code_and_skips_comments_and_docstrings(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Docs may say pickle."""\n'
        "import pickle  # flagged\n"
        "x = torch.load(p, weights_only=False)\n"
        "y = np.load(p, allow_pickle=True)\n"
        "z = np.load(p, allow_pickle=False)  # fine, and a comment about pickle\n"
        "# a comment about pickle\n"
        "def f():\n"
        '    """No pickle here either."""\n'
    )
    assert [hit.split(":")[1] for hit in pickle_uses(sample)] == ["2", "3", "4"]
