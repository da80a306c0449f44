"""Stages point one way: cli -> deploy -> export -> core. Every module's imports are parsed (top-level and inside
functions) and an import of a later stage fails the test, so the rule is kept by CI rather than by memory."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: folder -> (its import root, its rank); a module may import ranks <= its own
ROOMS = {"ctxsim": ("ctxsim", 0), "export": ("ctxsim.export", 1), "deploy": ("ctxsim.deploy", 2),
         "cli": ("ctxsim.cli", 3)}


def stage_of(module: str) -> int | None:
    """The rank of an absolute ctxsim module name (None for anything outside ctxsim)."""
    if module != "ctxsim" and not module.startswith("ctxsim."):
        return None
    for root, rank in sorted((r for r in ROOMS.values()), key=lambda rr: -len(rr[0])):
        if module == root or module.startswith(root + "."):
            return rank
    return 0


def upward_imports(source: str, rank: int) -> list[str]:
    """'line N: module' for each import in ``source`` of a stage later than ``rank``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            target = stage_of(name)
            if target is not None and target > rank:
                out.append((node.lineno, name))
                break
    return [f"line {line}: {name}" for line, name in sorted(out)]


def _modules():
    for folder, (_, rank) in ROOMS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            yield pytest.param(path, rank, id=str(path.relative_to(REPO)))


@pytest.mark.parametrize("path,rank", list(_modules()))
def test_no_module_imports_a_later_stage(path, rank):
    assert upward_imports(path.read_text(encoding="utf-8"), rank) == []


def test_the_check_sees_upward_imports():
    planted = "def f():\n    from ctxsim.deploy.search import write_grid\n\nimport ctxsim.cli.app\n"
    assert upward_imports(planted, 0) == ["line 2: ctxsim.deploy.search", "line 4: ctxsim.cli.app"]
    assert upward_imports(planted, 1) == ["line 2: ctxsim.deploy.search", "line 4: ctxsim.cli.app"]
    assert upward_imports("from ctxsim.export import export_run\nimport numpy\n", 2) == []
    assert upward_imports("from ctxsim import errors\nfrom ctxsim.data import datasets\n", 0) == []
    assert stage_of("ctxsim.exporter") == 0 and stage_of("ctxsim.export.api") == 1
