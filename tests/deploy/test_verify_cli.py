"""`ctxsim verify PATH` as a CI/CD step runs it (a real subprocess): exit 0 when a run, export or index folder is
bound and consistent, 1 naming what is not, 2 with one line when PATH is no such folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_verified_deploy import flip_tensor_bytes


def verify(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxsim.cli", "verify", str(path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, run_dir) -> Path:
    from ctxsim.export import export_run

    out = tmp_path_factory.mktemp("verify-export") / "export"
    assert export_run(run_dir, out, parity_limit=100).passed
    return out


@pytest.mark.parametrize("which", ["run", "export", "index"])
def test_clean_folders_verify(which, run_dir, export_dir, flat_index):
    path = {"run": run_dir, "export": export_dir, "index": flat_index}[which]
    p = verify(path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{which} folder" in p.stdout and "FAIL" not in p.stdout and "everything bound and consistent" in p.stdout


def test_partially_reexported_export_folder(tmp_path, export_dir, other_run_dir):
    from ctxsim.export import export_onnx

    folder = shutil.copytree(export_dir, tmp_path / "E")
    (folder / "model.onnx").write_bytes(export_onnx(other_run_dir, tmp_path / "o").onnx_path.read_bytes())
    p = verify(folder)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines and all("model.onnx:" in line for line in lines)  # named, and nothing else blamed
    assert "no verdict" in p.stdout  # parity.json's "passed" is not for these bytes


def test_corrupted_run_and_index(tmp_path, run_dir, flat_index, other_run_dir):
    run = shutil.copytree(run_dir, tmp_path / "run")
    flip_tensor_bytes(run / "model.safetensors")
    p = verify(run)
    assert p.returncode == 1 and "model.safetensors" in p.stderr, p.stdout + p.stderr

    index = shutil.copytree(flat_index, tmp_path / "index")
    info = json.loads((index / "index.json").read_text())
    emb = index / info["files"]["embeddings"]
    emb.write_bytes(emb.read_bytes()[:-4] + b"\xff\xff\xff\xff")
    p = verify(index)
    assert p.returncode == 1 and info["files"]["embeddings"] in p.stderr, p.stdout + p.stderr

    index2 = shutil.copytree(flat_index, tmp_path / "index2")  # names a model other than the one that built it
    (index2 / "index.json").write_text(json.dumps({**info, "model": str(other_run_dir)}))
    p = verify(index2)
    assert p.returncode == 1 and "the index was built with" in p.stderr, p.stdout + p.stderr

    index3 = shutil.copytree(flat_index, tmp_path / "index3")  # names the run whose weights are damaged
    (index3 / "index.json").write_text(json.dumps({**info, "model": str(run)}))
    p = verify(index3)
    assert p.returncode == 1 and f"{run}/model.safetensors" in p.stderr, p.stdout + p.stderr


def test_unusable_input_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("not a ctxsim folder")
    for path in (tmp_path, tmp_path / "missing", tmp_path / "notes.txt"):
        p = verify(path)
        assert p.returncode == 2, p.stdout + p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error:"), p.stderr
