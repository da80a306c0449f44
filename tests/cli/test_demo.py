"""`ctxsim demo`, the README's main job: every stage runs offline on the shipped sample and leaves its artifacts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

STAGES = {"untrained evaluation", "training", "export + parity", "gallery + index", "search", "bench"}


def run_demo(out: Path, *args: str, threads: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "220"}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    proc = subprocess.run([sys.executable, "-m", "ctxsim.cli", "demo", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_artifacts(out: Path, proc: subprocess.CompletedProcess) -> dict:
    for title in ("training: ", "export: parity", "index + search", "bench: this machine", "stages: wall seconds"):
        assert title in proc.stdout
    parity = json.loads((out / "export" / "parity.json").read_text())
    assert set(parity) == {"model.onnx", "model.fp16.onnx"} and all(r["passed"] for r in parity.values()), parity
    assert "R@1 flips (near-ties)" in proc.stdout
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    index = json.loads((out / "index" / "index.json").read_text())
    assert index["fingerprint"] == manifest["fingerprint"]
    assert index["count"] == len(list((out / "gallery").glob("*/*.png")))
    for png in ("search.png", "learning_curve.png"):
        with Image.open(out / png) as im:
            assert im.width > 0 and im.height > 0
    assert "onnx" in (out / "bench" / "bench.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages_s"]) == STAGES and all(v >= 0 for v in summary["stages_s"].values())
    assert all(Path(p).exists() for p in summary["files"].values()), summary["files"]
    assert summary["curve"][0]["label"] == "untrained" and summary["curve"][0]["images_seen"] == 0
    assert summary["curve"][-1]["R@1"] == summary["trained"]["R@1"]
    return summary


def test_demo_on_the_shipped_omniglot_sample(tmp_path):
    """The default demo: training shows on alphabets it never saw (one epoch here; the full demo runs three)."""
    out = tmp_path / "demo"
    proc = run_demo(out, "--epochs", "1")
    assert "training: 5 held-out Omniglot alphabets" in proc.stdout
    summary = check_artifacts(out, proc)
    assert summary["dataset"] == "omniglot-mini"
    untrained, trained = summary["untrained"], summary["trained"]
    assert untrained["R@1"] < 0.3  # 148 unseen characters: a random ConvNet retrieves poorly
    assert trained["R@1"] - untrained["R@1"] > 0.25 and trained["MAP@R"] > 2 * untrained["MAP@R"], summary
    assert summary["gain"]["R@1"] == pytest.approx(trained["R@1"] - untrained["R@1"])
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["test/R@1"] == trained["R@1"]


# One thread trains a slightly different model, whose fp16 graph flips two near-tied queries (margins ~1e-4):
# parity must still pass, since those verdicts are decided by rounding (docs/EXPORT.md, "Near-ties").
def test_demo_on_digits_with_one_thread(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo(out, "--dataset", "digits", "--epochs", "2", threads="1")
    assert "training: digits 5-9" in proc.stdout
    summary = check_artifacts(out, proc)
    assert summary["dataset"] == "digits" and summary["trained"]["R@1"] > 0.5  # 5 unseen digits: chance ~0.2


def test_demo_refuses_an_unknown_dataset(tmp_path):
    from ctxsim.cli.demo import run_demo as demo
    from ctxsim.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown demo dataset 'mnist'; use omniglot-mini or digits"):
        demo(tmp_path / "d", dataset="mnist")


def test_demo_without_onnx_runtime_names_the_extras_first(tmp_path):
    """ONNX Runtime is the extra [cpu] or [gpu]: without it the demo stops before training, in one line."""
    code = ("import sys; sys.modules['onnxruntime'] = None; from ctxsim.cli.app import main; "
            f"sys.argv = ['ctxsim', 'demo', '--out', {str(tmp_path / 'd')!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "pip install 'ctxsim[cpu]' (CPU) or 'ctxsim[gpu]'" in proc.stderr  # brackets survive the console
    assert not (tmp_path / "d" / "run").exists()
