"""Unit tests test the library alone: none imports the benchmarks (their own tests live in
``tests/bench``), so a change to a benchmark never breaks or slows the unit suite."""

from __future__ import annotations

import ast
from pathlib import Path

UNIT = Path(__file__).resolve().parent


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_unit_test_imports_the_benchmarks() -> None:
    offenders = sorted(
        str(path.relative_to(UNIT))
        for path in UNIT.rglob("*.py")
        if "bench" in _imported_roots(path)
    )
    assert offenders == []
