"""`ctxsim demo`, the README's main job: every stage runs offline and leaves its artifacts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from PIL import Image


# One thread trains a slightly different model, whose fp16 graph flips two near-tied queries (margins ~1e-4):
# parity must still pass, since those verdicts are decided by rounding (docs/EXPORT.md, "Near-ties").
@pytest.mark.parametrize("threads", [None, "1"], ids=["default-threads", "one-thread"])
def test_demo_runs_end_to_end(tmp_path, threads):
    out = tmp_path / "demo"
    env = {**os.environ, "COLUMNS": "220"}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    proc = subprocess.run([sys.executable, "-m", "ctxsim.cli", "demo", "--out", str(out), "--epochs", "2"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for title in ("training: digits 5-9", "export: parity", "index + search", "bench: this machine"):
        assert title in proc.stdout
    parity = json.loads((out / "export" / "parity.json").read_text())
    assert set(parity) == {"model.onnx", "model.fp16.onnx"} and all(r["passed"] for r in parity.values()), parity
    assert "R@1 flips (near-ties)" in proc.stdout
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    index = json.loads((out / "index" / "index.json").read_text())
    assert index["fingerprint"] == manifest["fingerprint"]
    assert index["count"] == len(list((out / "gallery").glob("*/*.png")))
    with Image.open(out / "search.png") as grid:
        assert grid.width > 0 and grid.height > 0
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["test/R@1"] > 0.5  # 5 unseen digit classes: chance is ~0.2
    assert "onnx" in (out / "bench" / "bench.md").read_text()
