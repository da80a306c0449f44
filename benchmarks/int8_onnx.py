"""int8 ONNX (ONNX Runtime static quantisation, QDQ) against fp32 on a real backbone: parity and CPU speed.

    python benchmarks/int8_onnx.py                      # trains a short omniglot-lite0 run first (~1 min)
    python benchmarks/int8_onnx.py --run runs/omni      # or any run folder with its data

The model: the omniglot-lite0 recipe (ImageNet EfficientNet-Lite0, 64 px) fine-tuned for 20 batches, a real
backbone at a real operating point. ``model.onnx`` is quantised with each calibration method on 256 images of
the run's training classes, then each int8 file is checked by ``check_parity`` (int8 thresholds) on the first
1,000 evaluation images, and timed with ONNX Runtime on the CPU against fp32 (batch 32, interleaved, median).
Writes benchmarks/results/int8_onnx.md (+ .json).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, machine, markdown_table

DATA = REPO.parent / "shared" / "data" / "omniglot"


def train_run(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "ctxsim.cli", "train", "--recipe", "omniglot-lite0", "--data", str(DATA),
                    "--out", str(out), "--set", "epochs=1", "--set", "data.batches_per_epoch=20",
                    "--set", "device=cpu"], check=True, capture_output=True)
    return out


def images_per_s(runner, x: np.ndarray, reps: int = 5) -> list[float]:
    runner.run(x)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        runner.run(x)
        out.append(len(x) / (time.perf_counter() - t0))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="a run folder (default: train a short lite0 run)")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    import torch

    from ctxsim.export import check_parity, export_onnx, open_runner, quantize_onnx
    from ctxsim.export.quantize import CALIBRATION_METHODS, image_batches, run_calibration_images

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = a.run or train_run(Path(tmp) / "run")
        fp32 = export_onnx(run, Path(tmp) / "export", fp16=True)
        calib = run_calibration_images(run, limit=256)
        ref = check_parity(run, fp32.onnx_path, limit=a.limit, write=False)
        half = check_parity(run, fp32.fp16_path, limit=a.limit, write=False)  # the near-tie evidence, same images
        x = next(image_batches(calib[:32], fp32.contract, 32))
        rows, data = [], {"machine": machine("cpu"), "images": ref.images, "rows": []}
        runners = {"fp32": open_runner(fp32.onnx_path)}
        reports = {}
        for method in CALIBRATION_METHODS:
            path = quantize_onnx(fp32.onnx_path, image_batches(calib, fp32.contract), method=method,
                                 out_path=Path(tmp) / f"{method}.int8.onnx")
            reports[method] = check_parity(run, path, limit=a.limit, write=False)
            runners[method] = open_runner(path)
        speed = {k: [] for k in runners}
        for _ in range(3):  # interleaved blocks
            for k, r in runners.items():
                speed[k] += images_per_s(r, x)
        base = statistics.median(speed["fp32"])
        for method, r in reports.items():
            ips = statistics.median(speed[method])
            rows.append([method, "pass" if r.passed else "FAIL", f"{r.embedding['cosine_p1']:.4f}",
                         f"{r.embedding['cosine_p50']:.4f}", f"{r.retrieval['delta_points']['R@1']:+.2f}",
                         f"{r.retrieval['ties']['delta_R@1_points']:+.2f}", f"{ips:,.0f}", f"{ips / base:.2f}x"])
            data["rows"].append({"method": method, "passed": r.passed, "failures": r.failures,
                                 "p1_cosine": r.embedding["cosine_p1"], "images_per_s": ips, "vs_fp32": ips / base,
                                 "delta_r1": r.retrieval["delta_points"]["R@1"]})
    md = (f"**int8 ONNX (ONNX Runtime static quantisation, QDQ, per-channel symmetric) vs fp32**: EfficientNet-Lite0 "
          f"at 64 px (omniglot-lite0, 20 training batches), parity on {ref.images} Omniglot evaluation images, "
          f"calibration on 256 training images.\n\nMachine: {data['machine']}; ONNX Runtime CPU, batch 32, "
          f"fp32 {base:,.0f} images/s (ONNX Runtime default threads; median of 3 interleaved blocks).\n\n"
          + markdown_table(["calibration", "int8 parity", "p1 cosine", "median cosine", "ΔR@1 raw (pts)",
                            "ΔR@1 checked (pts)", "images/s", "vs fp32"], rows)
          + f"\n\nThe fp16 graph on the same images: min cosine {half.embedding['cosine_min']:.6f}, "
          f"{half.retrieval['ties']['flips']} R@1 flips of which {half.retrieval['ties']['flips_near_tied']} "
          f"near-ties (margin < {half.retrieval['ties']['tie_margin']:g}), raw ΔR@1 "
          f"{half.retrieval['delta_points']['R@1']:+.2f} points, checked {half.retrieval['ties']['delta_R@1_points']:+.2f}: "
          f"{'pass' if half.passed else 'FAIL'} (limit 0.2).")
    data["fp16"] = {"ties": {k: v for k, v in half.retrieval["ties"].items() if k != "examples"},
                    "raw_delta_r1": half.retrieval["delta_points"]["R@1"], "passed": half.passed}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "int8_onnx.md").write_text(md + "\n")
    import json

    (a.out / "int8_onnx.json").write_text(json.dumps(data, indent=1) + "\n")
    print(md)
    return data


if __name__ == "__main__":
    main()
