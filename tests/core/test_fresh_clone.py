"""A fresh clone is the whole product: no test skips for lack of data (only for hardware or servers it lacks).

tests/conftest.py fails the run when any skip reason blames missing data (``pytest_sessionfinish``); these tests
check that guard in a child pytest, and check statically that no skip in the suite names missing data outside the
``slow`` tests that read the full Omniglot from $CTXSIM_OMNIGLOT.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def _conftest():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ctxsim_tests_conftest", TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("reason,is_data", [
    ("Omniglot zips not found at /work/shared/data/omniglot", True),
    ("dataset CUB_200_2011 missing", True),
    ("gallery images not present on this machine", True),
    ("needs TensorRT and a CUDA GPU (neither is on the development machines)", False),
    ("TorchCodec is not installed (pip install 'ctxsim[decode]')", False),
    ("needs a CUDA GPU", False),
    ("cannot download tensorrt-stubs==10.3 (URLError); set CTXSIM_TRT_STUBS_WHEEL to a local copy of the wheel", False),
])
def test_data_skip_reasons_are_recognised(reason, is_data):
    assert _conftest().is_data_skip(reason) is is_data


def _skip_reasons(tree: ast.AST):
    """(function node or None, reason text) of every pytest.skip/importorskip/skipif call with a literal reason."""
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr not in ("skip", "importorskip", "skipif"):
            continue
        texts = [a for a in node.args if isinstance(a, (ast.Constant, ast.JoinedStr))]
        texts += [k.value for k in node.keywords if k.arg in ("reason", "msg")]
        for t in texts:
            if isinstance(t, ast.Constant) and isinstance(t.value, str):
                text = t.value
            elif isinstance(t, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in t.values)
            else:
                continue
            owner = node
            while owner in parents and not isinstance(owner, ast.FunctionDef):
                owner = parents[owner]
            yield (owner if isinstance(owner, ast.FunctionDef) else None), text


def _is_slow(fn: ast.FunctionDef) -> bool:
    return any("slow" in ast.unparse(d) for d in fn.decorator_list)


def test_no_skip_in_the_suite_blames_missing_data():
    conftest = _conftest()
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn, reason in _skip_reasons(tree):
            if not conftest.is_data_skip(reason):
                continue
            if fn is not None and (_is_slow(fn) or fn.name == "omniglot_full"):
                continue  # the full Omniglot: slow tests only (checked below)
            offenders.append(f"{path.relative_to(TESTS)}:{fn.name if fn else '<module>'}: {reason}")
    assert not offenders, "use the omniglot_dir (shipped sample) or fake_omniglot fixture instead:\n" + \
        "\n".join(offenders)


def test_the_full_omniglot_is_read_by_slow_tests_only():
    users = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, ast.FunctionDef) and "omniglot_full" in [a.arg for a in fn.args.args]:
                users.append((path.name, fn.name, _is_slow(fn)))
    assert users and all(slow for *_, slow in users), users


def test_a_data_skip_fails_the_run(tmp_path):
    """The guard itself, in a child pytest: a data skip fails the run, a hardware skip does not."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    (tmp_path / "test_hw.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_gpu():\n    pytest.skip('needs a CUDA GPU')\n\n"
        "def test_ok():\n    pass\n")
    run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    ok = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout[-2000:]
    (tmp_path / "test_data.py").write_text(
        "import pytest\n\ndef test_needs_data():\n    pytest.skip('Omniglot zips not found at /nowhere')\n")
    bad = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 1 and "skipped for missing data" in bad.stdout, bad.stdout[-2000:]
    assert "test_data.py::test_needs_data: Omniglot zips not found" in bad.stdout
