"""ONNX Runtime (CPU) vs PyTorch eager (CPU): images/s of the exported embedding model at batch 1 and 32.

Two models, random weights (speed does not depend on the values): the demo-sized ConvNet (32 px greyscale, the
digits-demo recipe's network) and a ResNet-50 embedding net at 224 px. Both are exported with
``ctxsim.export.export_onnx`` (fp32, opset 17) and run in one process; the engines are interleaved repetition by
repetition (so background load hits both alike) and the median images/s is reported. Outputs are checked to
agree (cosine > 0.9999) before timing.

    .venv/bin/python benchmarks/onnx_vs_torch.py [--threads 1] [--reps 7] [--resnet-reps 3]

Both engines get the same number of intra-op threads (default 1: on a shared, oversubscribed machine a
multi-threaded OpenMP run measures scheduler contention rather than the engine; pass --threads 0 for "all
cores" on a quiet machine). The load average at start and end is printed with the table.

Prints a markdown table and writes it to benchmarks/results/onnx_vs_torch.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import cpu_name  # noqa: E402


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_model(folder: Path, spec: dict, preprocess) -> Path:
    from ctxsim.nets import EmbeddingNet, ModelSpec, save_model

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, EmbeddingNet(ModelSpec(**spec)), preprocess)
    return folder


def time_call(fn, x, min_seconds: float, min_iters: int) -> float:
    """Images per second of ``fn(x)`` over at least ``min_iters`` calls and ``min_seconds``."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        elapsed = time.perf_counter() - t0
        if n >= min_iters and elapsed >= min_seconds:
            return n * len(x) / elapsed


def bench(name: str, run_dir: Path, out_dir: Path, batches: tuple[int, ...], reps: int,
          min_seconds: float, threads: int) -> list[dict]:
    from ctxsim.export import OnnxRunner, export_onnx
    from ctxsim.nets import load_run

    model, card = load_run(run_dir)
    runner = OnnxRunner(export_onnx(run_dir, out_dir).onnx_path, providers=["CPUExecutionProvider"],
                        intra_op_threads=threads)
    c, s = card.preprocess.num_channels, card.preprocess.input_size
    rows = []
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, c, s, s)).astype(np.float32)
        xt = torch.from_numpy(x)

        def torch_fn(_x):
            with torch.inference_mode():
                return model(xt)

        ref, got = torch_fn(x).numpy(), runner.run(x)
        cos = float(((ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)).min())
        assert cos > 0.9999, f"{name}: ONNX and PyTorch disagree (cosine {cos})"
        torch_fn(x), runner.run(x)  # warm-up
        t_torch, t_ort = [], []
        for _ in range(reps):  # interleaved
            iters = 3 if b == 1 else 1  # a ResNet-50 batch of 32 takes seconds on its own
            t_torch.append(time_call(torch_fn, x, min_seconds, iters))
            t_ort.append(time_call(runner.run, x, min_seconds, iters))
        mt, mo = statistics.median(t_torch), statistics.median(t_ort)
        rows.append({"model": name, "input": f"{c}x{s}x{s}", "batch": b, "torch": mt, "ort": mo, "ratio": mo / mt,
                     "reps": reps})
        print(f"  {name} batch {b}: torch {mt:.1f} img/s, onnxruntime {mo:.1f} img/s", file=sys.stderr)
    return rows


def table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| model | input (CxHxW) | batch | PyTorch eager img/s | ONNX Runtime CPU img/s | ORT / PyTorch | reps |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {r['batch']} | {r['torch']:.1f} | {r['ort']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['reps']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    from ctxsim.data.transforms import Preprocess
    from ctxsim.io import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for both engines (0: all cores)")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions for the ConvNet")
    ap.add_argument("--resnet-reps", type=int, default=3, help="interleaved repetitions for ResNet-50")
    ap.add_argument("--min-seconds", type=float, default=0.5, help="minimum timed seconds per measurement")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "onnx_vs_torch.md")
    args = ap.parse_args(argv)
    threads = args.threads if args.threads > 0 else usable_cores()
    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        convnet = make_model(tmp / "convnet", dict(backbone="convnet", in_channels=1, embedding_dim=64,
                                                   pooling="avg", standardize=True, frozen_bn=False),
                             Preprocess.greyscale(32, 32))
        resnet = make_model(tmp / "resnet50", dict(backbone="resnet50", embedding_dim=512, pooling="max",
                                                   pretrained=None), Preprocess.imagenet(224, 256))
        rows = bench("ConvNet (demo)", convnet, tmp / "convnet_onnx", (1, 32), args.reps, args.min_seconds, threads)
        rows += bench("ResNet-50", resnet, tmp / "resnet50_onnx", (1, 32), args.resnet_reps, args.min_seconds,
                      threads)

    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (
        f"### ONNX Runtime vs PyTorch on CPU\n\n"
        f"Machine: {cpu_name()}, {usable_cores()} usable cores ({os.cpu_count()} logical CPUs), "
        f"1-minute load average {load_start:.1f} at start, {load_end:.1f} at end. "
        f"Python {platform.python_version()}; torch {torch.__version__} and onnxruntime {ort.__version__} "
        f"(CPUExecutionProvider), {threads} intra-op thread(s) each. Random weights (speed only); fp32; "
        f"median of interleaved repetitions, each >= {args.min_seconds} s. ResNet-50: embedding dim 512, "
        f"max pooling; ConvNet: the digits-demo network (4 conv blocks, 64 wide, 32 px greyscale).")
    text = table(rows, header)
    print(text)
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
