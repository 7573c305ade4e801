"""Imports run one way: plain data (protocol, request, config, hashing) <- core <- engine,
and models <- worker; nothing reaches back up (read statically from the source)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[3] / "kvserve"

# module (file or package dir, relative to kvserve/) -> module prefixes it must not import
RULES = {
    "protocol.py": ("kvserve.core", "kvserve.worker", "kvserve.engine", "kvserve.models"),
    "request.py": ("kvserve.core", "kvserve.worker", "kvserve.engine", "kvserve.models"),
    "config.py": ("kvserve.core", "kvserve.worker", "kvserve.engine", "kvserve.models", "torch"),
    "hashing.py": ("kvserve.core", "kvserve.worker", "kvserve.engine", "kvserve.models", "torch"),
    "core": ("kvserve.worker", "kvserve.engine", "kvserve.models", "torch"),
    "models": ("kvserve.worker", "kvserve.engine", "kvserve.core"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, TYPE_CHECKING blocks excepted (they never run)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("where", list(RULES))
def test_no_import_runs_back_up(where):
    target = PKG / where
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    bad = []
    for f in files:
        for mod in imported_modules(f):
            if any(mod == p or mod.startswith(p + ".") for p in RULES[where]):
                bad.append(f"{f.relative_to(PKG)} imports {mod}")
    assert not bad, bad
