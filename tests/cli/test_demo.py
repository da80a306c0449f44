"""`ctxsim demo`, the README's main job: every stage runs offline and leaves its artifacts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "ctxsim.cli", "demo", "--out", str(out), "--epochs", "2"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for title in ("training: digits 5-9", "export: parity", "index + search", "bench: this machine"):
        assert title in proc.stdout
    parity = json.loads((out / "export" / "parity.json").read_text())
    assert set(parity) == {"model.onnx", "model.fp16.onnx"} and all(r["passed"] for r in parity.values())
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    index = json.loads((out / "index" / "index.json").read_text())
    assert index["fingerprint"] == manifest["fingerprint"]
    assert index["count"] == len(list((out / "gallery").glob("*/*.png")))
    with Image.open(out / "search.png") as grid:
        assert grid.width > 0 and grid.height > 0
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["test/R@1"] > 0.5  # 5 unseen digit classes: chance is ~0.2
    assert "onnx" in (out / "bench" / "bench.md").read_text()
