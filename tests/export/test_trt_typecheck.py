"""Static proof that export/tensorrt.py calls the TensorRT Python API correctly, on machines without TensorRT:
mypy checks it against the repaired tensorrt-stubs in typings/ (scripts/repair_trt_stubs.py), configured by
[tool.mypy] in pyproject.toml.

The check must never go vacuous (``trt`` typed as Any passes everything), so planted defects in a copy of the
file must be reported on their lines, and ``tensorrt`` must resolve to the stub. The committed stub must be what
the script makes of the pinned wheel (slow: downloads it, or reads CTXSIM_TRT_STUBS_WHEEL)."""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from mypy import api as mypy_api

REPO = Path(__file__).resolve().parents[2]
TARGET = REPO / "export" / "tensorrt.py"
TYPINGS = REPO / "typings"
STUB = TYPINGS / "tensorrt" / "__init__.pyi"
CONFIG = REPO / "pyproject.toml"
SCRIPT = REPO / "scripts" / "repair_trt_stubs.py"
ERROR = re.compile(r"^(?P<path>.+?):(?P<line>\d+): error: (?P<message>.*)$")
NOTE = re.compile(r"^(?P<path>.+?):(?P<line>\d+): note: (?P<message>.*)$")


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("repair_trt_stubs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module's runs (the stub is parsed once), outside the tree."""
    return tmp_path_factory.mktemp("mypy_cache")


@pytest.fixture
def run_mypy(monkeypatch: pytest.MonkeyPatch, mypy_cache: Path):
    """mypy over some files with the project's configuration, from the repository root (so ``ctxsim`` resolves
    for copies outside it) and with MYPYPATH on typings/; returns (report, exit status, [(path, line, message)])."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MYPYPATH", str(TYPINGS))

    def run(*paths: Path) -> tuple[str, int, list[tuple[Path, int, str]]]:
        stdout, stderr, status = mypy_api.run(["--config-file", str(CONFIG), "--cache-dir", str(mypy_cache),
                                               "--show-absolute-path", "--no-pretty", "--no-color-output",
                                               *map(str, paths)])
        errors = [(Path(m["path"]).resolve(), int(m["line"]), m["message"])
                  for m in map(ERROR.match, stdout.splitlines()) if m]
        return f"{stdout}{stderr}".strip(), status, errors

    return run


def test_tensorrt_calls_typecheck(run_mypy):
    report, status, errors = run_mypy(TARGET)
    assert status == 0 and not errors, f"mypy on {TARGET.relative_to(REPO)} (typings/ stubs):\n{report}"


# ---------------------------------------------------------------------------------------------- non-vacuity
def _calls(tree: ast.AST, method: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == method]


def _offset(lines: list[str], lineno: int, col: int) -> int:
    """Character offset of an ast (line, utf-8 column) position in the joined ``lines``."""
    return sum(map(len, lines[:lineno - 1])) + len(lines[lineno - 1].encode()[:col].decode())


def plant_defects(src: str) -> tuple[str, dict[str, range]]:
    """``src`` with three defects a checked file cannot hide, and the lines mypy must flag for each: a misspelt
    Builder method, ``execute_async_v3()`` without its stream, ``set_memory_pool_limit`` without the size."""
    tree = ast.parse(src)
    lines = src.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []
    expected: dict[str, range] = {}
    plants = {
        "build_serialized_network": "misspelt build_serialised_network",
        "execute_async_v3": "execute_async_v3() without the stream",
        "set_memory_pool_limit": "set_memory_pool_limit(pool) without the size",
    }
    for method, label in plants.items():
        calls = _calls(tree, method)
        assert calls, f"{TARGET.relative_to(REPO)} no longer calls .{method}(...); plant another TensorRT call"
        call = calls[0]
        func = call.func
        assert isinstance(func, ast.Attribute) and func.end_lineno is not None and call.end_lineno is not None
        func_end = _offset(lines, func.end_lineno, func.end_col_offset or 0)
        call_end = _offset(lines, call.end_lineno, call.end_col_offset or 0)
        if method == "build_serialized_network":
            edits.append((func_end - len(method), func_end, "build_serialised_network"))
        elif method == "execute_async_v3":
            edits.append((func_end, call_end, "()"))
        else:
            assert len(call.args) == 2 and not call.keywords, ast.unparse(call)
            first = call.args[0]
            assert first.end_lineno is not None
            edits.append((_offset(lines, first.end_lineno, first.end_col_offset or 0), call_end, ")"))
        expected[label] = range(call.lineno, call.end_lineno + 1)
    out = "".join(lines)
    for start, end, text in sorted(edits, reverse=True):
        out = out[:start] + text + out[end:]
    return out, expected


def test_plants_change_only_what_they_say():
    planted, expected = plant_defects(TARGET.read_text(encoding="utf-8"))
    assert "build_serialised_network(" in planted and ".execute_async_v3()" in planted
    assert len(planted.splitlines()) == len(TARGET.read_text(encoding="utf-8").splitlines())
    assert len(expected) == 3


GUARD = '''\
import tensorrt as trt

reveal_type(trt.Builder)
reveal_type(trt.OnnxParser.parse)
reveal_type(trt.__version__)
not_a_builder: int = trt.Builder
'''


def test_planted_defects_are_reported(run_mypy, tmp_path: Path):
    planted_src, expected = plant_defects(TARGET.read_text(encoding="utf-8"))
    planted = tmp_path / "planted_tensorrt.py"
    planted.write_text(planted_src, encoding="utf-8")
    guard = tmp_path / "planted_resolution.py"
    guard.write_text(GUARD, encoding="utf-8")
    report, status, errors = run_mypy(planted, guard)
    assert status == 1, report
    for label, lines in expected.items():
        hits = [e for e in errors if e[0] == planted.resolve() and e[1] in lines]
        assert hits, f"mypy did not flag the planted defect ({label}) on lines {lines.start}-{lines.stop - 1} " \
                     f"of the copy of {TARGET.relative_to(REPO)}: is `trt` typed as Any there?\n{report}"
    # `tensorrt` is the stub in typings/, not Any (Any would be assignable to int and reveal as "Any")
    notes = [m["message"] for m in map(NOTE.match, report.splitlines()) if m and Path(m["path"]).name == guard.name]
    assert any("tensorrt.Builder" in n for n in notes), report
    # (mypy 1.x spells builtins "builtins.bool", 2.x "bool"); the stub's `bool: DataType` repair is what makes it bool
    assert any(re.search(r'-> (builtins\.)?bool"$', n) for n in notes), f"OnnxParser.parse should return bool\n{report}"
    assert any(re.fullmatch(r'Revealed type is "(builtins\.)?str"', n) for n in notes), report
    assert any(e[0] == guard.resolve() and e[1] == 6 and "Incompatible types in assignment" in e[2]
               for e in errors), report


# ---------------------------------------------------------------------------------------------- the stub
def test_committed_stub_records_its_source_and_parses():
    script = load_script()
    stub = STUB.read_text(encoding="utf-8")
    assert stub.startswith(script.HEADER), "typings/tensorrt/__init__.pyi is not the script's output; rerun it"
    assert script.VERSION in stub and script.SHA256 in stub and "\r" not in stub
    readme = (TYPINGS / "README.md").read_text(encoding="utf-8")
    for fact in (script.PACKAGE, script.VERSION, script.SHA256, "scripts/repair_trt_stubs.py", "__version__"):
        assert fact in readme, fact
    assert (TYPINGS / "tensorrt" / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    tree = ast.parse(stub, feature_version=(3, 10))
    top = {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"__version__", "bool", "float16", "float32"} <= top
    assert {"Builder", "IBuilderConfig", "IExecutionContext", "OnnxParser", "Runtime"} <= classes


@pytest.mark.slow
def test_committed_stub_is_what_the_script_makes(tmp_path: Path):
    script = load_script()
    local = os.environ.get("CTXSIM_TRT_STUBS_WHEEL")
    if local:
        wheel = Path(local).read_bytes()
    else:
        try:
            wheel = script.download_wheel(tmp_path, timeout=60).read_bytes()
        except Exception as e:  # noqa: BLE001 - offline, no index, pip error: the fast test still checks the header
            pytest.skip(f"cannot download {script.PACKAGE}=={script.VERSION} ({type(e).__name__}); "
                        "set CTXSIM_TRT_STUBS_WHEEL to a local copy of the wheel")
    files = script.generate(wheel)
    assert files == script.generate(wheel), "the repair is not deterministic"
    assert sorted(files) == ["README.md", "tensorrt/LICENSE", "tensorrt/__init__.pyi"]
    for rel, data in files.items():
        assert (TYPINGS / rel).read_bytes() == data, f"typings/{rel} differs from the script's output; rerun " \
                                                      "scripts/repair_trt_stubs.py and review the diff"
    with pytest.raises(script.StubError, match="sha256"):
        script.read_wheel(wheel + b"\0")
