"""An export folder is published as one unit, and a verdict counts only for the exact bytes it was computed on.

The reported bug: `cp -r run/export E; ctxsim export RUN2 --out E`, killed once model.onnx changed, left RUN2's
model.onnx beside RUN1's parity.json ("passed") and manifest.json, and readers trusted that verdict. Here the
killed re-export is simulated deterministically (files swapped by hand) and for real (a CLI subprocess that
SIGKILLs itself at a named point while publishing, via the CTXSIM_FAULT hook of ctxsim.io)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ctxsim.errors import ArtifactError
from ctxsim.export import check_artifact, export_onnx, export_run, read_manifest, verify_export
from ctxsim.export.parity import parity_record, recorded_verdict
from ctxsim.io import FAULT_ENV, sha256_file
from ctxsim.verify import FAIL

from export_helpers import make_run

LIMIT = 100


@pytest.fixture(scope="module")
def published(tmp_path_factory, convnet_run) -> Path:
    """RUN1's export folder (fp32 + fp16 ONNX, parity passed, manifest); copy it before changing it."""
    out = tmp_path_factory.mktemp("published") / "export"
    assert export_run(convnet_run, out, parity_limit=LIMIT).passed
    return out


@pytest.fixture(scope="module")
def run2(tmp_path_factory, omniglot_dir) -> Path:
    return make_run(tmp_path_factory.mktemp("run2") / "omni", "convnet", omniglot_dir, seed=1)


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in folder.iterdir() if p.is_file()}


def _failures(folder: Path) -> list:
    return [c for c in verify_export(folder, label="") if c.status == FAIL]


def test_published_export_verifies(published):
    assert _failures(published) == []
    assert recorded_verdict(published / "model.onnx") == (True, [])
    record = json.loads((published / "parity.json").read_text())["model.onnx"]
    assert record["sha256"] == sha256_file(published / "model.onnx")  # the verdict names its bytes
    assert read_manifest(published)["parity"]["model.onnx"]["sha256"] == record["sha256"]
    assert str(published) in record["artifact"] and ".staging" not in record["artifact"]
    assert not [p for p in published.iterdir() if p.name.startswith(".")]


def test_stale_verdict_of_a_half_reexported_folder_is_no_verdict(tmp_path, published, run2):
    """model.onnx now holds RUN2's model; parity.json and manifest.json still describe RUN1's bytes."""
    folder = shutil.copytree(published, tmp_path / "E")
    (folder / "model.onnx").write_bytes(export_onnx(run2, tmp_path / "run2-export").onnx_path.read_bytes())
    assert json.loads((folder / "parity.json").read_text())["model.onnx"]["passed"] is True  # what it still says
    assert recorded_verdict(folder / "model.onnx") == (None, [])
    assert "other bytes" in parity_record(folder / "model.onnx")[1]
    assert recorded_verdict(folder / "model.fp16.onnx") == (True, [])  # untouched: its verdict stands
    with pytest.raises(ArtifactError, match="does not match the sha256 in manifest.json"):
        check_artifact(folder / "model.onnx")
    bad = _failures(folder)
    assert {c.item for c in bad} == {"model.onnx"} and {c.check for c in bad} >= {"sha256 in manifest.json",
                                                                                  "model fingerprint"}
    assert not [c for c in verify_export(folder, label="") if c.item == "model.onnx" and c.status == "ok"]


def test_a_record_without_sha256_is_no_verdict(tmp_path, published):
    folder = shutil.copytree(published, tmp_path / "E")
    records = json.loads((folder / "parity.json").read_text())
    del records["model.onnx"]["sha256"]  # as written before records were bound to bytes
    (folder / "parity.json").write_text(json.dumps(records))
    assert recorded_verdict(folder / "model.onnx") == (None, [])
    assert [c.item for c in _failures(folder)] == ["model.onnx"]  # the manifest claims a verdict parity.json lacks


def test_a_failure_midway_leaves_the_previous_export_intact(tmp_path, published, run2, monkeypatch):
    """A re-export that fails in its parity step (after the ONNX files were written) publishes nothing."""
    import ctxsim.export.parity as parity_mod

    folder = shutil.copytree(published, tmp_path / "E")
    before = _snapshot(folder)
    real = parity_mod.check_parity
    calls = []

    def failing(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise ArtifactError("simulated failure in the parity step")
        return real(*args, **kwargs)

    monkeypatch.setattr(parity_mod, "check_parity", failing)
    with pytest.raises(ArtifactError, match="simulated"):
        export_run(run2, folder, parity_limit=LIMIT)
    assert len(calls) == 2
    assert _snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)  # no staging folder left behind
    assert _failures(folder) == []


def test_a_reexport_replaces_the_whole_unit(tmp_path, published, run2):
    """What the previous export bound and the new one does not write (fp16 model, parity records) goes."""
    folder = shutil.copytree(published, tmp_path / "E")
    (folder / "notes.txt").write_text("mine")  # not an export's: never touched
    result = export_run(run2, folder, fp16=False, parity=False)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx", "notes.txt"]
    assert result.onnx_path == folder / "model.onnx" and result.manifest_path == folder / "manifest.json"
    assert read_manifest(folder)["fingerprint"] == result.fingerprint != read_manifest(published)["fingerprint"]
    assert _failures(folder) == [] and recorded_verdict(folder / "model.onnx") == (None, [])
    assert check_artifact(folder / "model.onnx")["sha256"] == sha256_file(folder / "model.onnx")


def _export_cli(run: Path, out: Path, fault: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(OMP_NUM_THREADS="1", **({FAULT_ENV: fault} if fault else {}))
    return subprocess.run([sys.executable, "-m", "ctxsim.cli", "export", str(run), "--out", str(out), "--limit",
                           str(LIMIT)], env=env, capture_output=True, text=True, timeout=600)


def _verify_cli(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxsim.cli", "verify", str(path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_killed_reexport_is_refused_then_repaired(tmp_path, published, run2):
    """A real `ctxsim export RUN2 --out E`, SIGKILLed right after it moved model.onnx into E: every reader refuses
    the mix, `ctxsim verify` names it (exit 1); the next export publishes a complete folder (exit 0)."""
    from ctxsim.deploy import Embedder

    folder = shutil.copytree(published, tmp_path / "E")
    p = _export_cli(run2, folder, "publish:model.onnx")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert sha256_file(folder / "model.onnx") != sha256_file(published / "model.onnx")  # RUN2's bytes are in
    assert json.loads((folder / "parity.json").read_text()) == json.loads((published / "parity.json").read_text())
    assert recorded_verdict(folder / "model.onnx") == (None, [])
    with pytest.raises(ArtifactError, match="manifest.json"):
        Embedder.from_artifact(folder / "model.onnx", device="cpu")
    v = _verify_cli(folder)
    assert v.returncode == 1, v.stdout + v.stderr
    assert "model.onnx" in v.stderr and "FAIL" in v.stdout

    p = _export_cli(run2, folder, None)
    assert p.returncode == 0, p.stderr[-2000:]
    v = _verify_cli(folder)
    assert v.returncode == 0, v.stdout + v.stderr
    assert not [q for q in folder.iterdir() if q.name.startswith(".")]  # the killed export's staging is gone
    assert recorded_verdict(folder / "model.onnx") == (True, [])


def test_killed_while_building_leaves_the_previous_export(tmp_path, published, run2):
    folder = shutil.copytree(published, tmp_path / "E")
    before = _snapshot(folder)
    p = _export_cli(run2, folder, "model.onnx:replaced")  # the atomic write of model.onnx, in the staging folder
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert _snapshot(folder) == before and _failures(folder) == []
