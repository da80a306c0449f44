"""Embedding throughput (images/s) per backend on the CPU: PyTorch eager vs ONNX Runtime (CPUExecutionProvider).

Models (untrained weights; speed does not depend on them): the demo-size ConvNet (digits-demo recipe: 1-channel
32 px, 64-d) and ResNet-18 at 112 px (RGB, 512-d). For each: the runner alone on a preprocessed batch (batch 1
latency and batch 64 throughput) and end to end (``Embedder.embed`` on PIL images: preprocessing + model).
Prints a markdown table naming the machine and writes it to benchmarks/results/embed_throughput.md (+ .json).

    python benchmarks/embed_throughput.py [--seconds 3] [--batch 64]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ctxsim.data.transforms import Preprocess
from ctxsim.deploy import Embedder
from ctxsim.deploy.bench import machine_info, markdown_table
from ctxsim.io import atomic_write_json, atomic_write_text
from ctxsim.nets import EmbeddingNet, ModelSpec, save_model

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "convnet 32px (demo)": (ModelSpec(backbone="convnet", embedding_dim=64, pooling="avg", in_channels=1,
                                      frozen_bn=False), Preprocess.greyscale(32, 32)),
    "resnet18 112px": (ModelSpec(backbone="resnet18", embedding_dim=512, pooling="max", in_channels=3),
                       Preprocess.imagenet(112, 128)),
}


def timed(fn, seconds: float, min_reps: int = 3) -> list[float]:
    fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="time budget per measurement")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "embed_throughput.md")
    args = ap.parse_args()

    from ctxsim.export import export_onnx

    rng = np.random.default_rng(0)
    rows, record = [], []
    with tempfile.TemporaryDirectory() as td:
        for name, (spec, pre) in MODELS.items():
            torch.manual_seed(0)
            run = Path(td) / name.split()[0]
            save_model(run, EmbeddingNet(spec), pre)
            onnx = export_onnx(run, run / "export").onnx_path
            mode = pre.channels
            images = [Image.fromarray(rng.integers(0, 256, (150, 120) + ((3,) if mode == "RGB" else ()),
                                                   dtype=np.uint8), mode) for _ in range(args.batch)]
            ref = None
            default_threads = torch.get_num_threads()
            for backend, art, threads in (("torch eager", run, default_threads), ("torch eager", run, 1),
                                          ("onnxruntime CPU", onnx, default_threads)):
                torch.set_num_threads(threads)  # torch's intra-op pool; ONNX Runtime keeps its own
                emb = Embedder.from_artifact(art, device="cpu", batch_size=args.batch)
                one, full = emb.preprocess(images[:1]), emb.preprocess(images)
                t1 = timed(lambda: emb.run(one), args.seconds)
                tb = timed(lambda: emb.run(full), args.seconds)
                te = timed(lambda: emb.embed(images), args.seconds)
                out = emb.embed(images)
                ref = out if ref is None else ref
                cos = float((out * ref).sum(axis=1).min())
                torch.set_num_threads(default_threads)
                label = f"{backend}, {threads} thread{'s' if threads > 1 else ''}" if backend.startswith("torch") \
                    else backend
                r = {"model": name, "backend": emb.backend, "label": label, "batch": args.batch,
                     "latency_b1_ms": 1e3 * statistics.median(t1),
                     "model_ips": args.batch / statistics.median(tb),
                     "end_to_end_ips": args.batch / statistics.median(te),
                     "min_cosine_vs_torch": cos, "reps": [len(t1), len(tb), len(te)]}
                record.append(r)
                rows.append([name, label, f"{r['latency_b1_ms']:.2f}", f"{r['model_ips']:,.0f}",
                             f"{r['end_to_end_ips']:,.0f}", f"{cos:.6f}"])

    m = machine_info()
    text = "\n".join([
        "## Embedding throughput on the CPU (images/s)", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, load average {_load()}, "
        f"GPU: {m['gpu'] or 'none'}; torch {m['torch']}, onnxruntime {m['onnxruntime']}. "
        f"Median over ~{args.seconds:.0f} s per cell; batch {args.batch}; inputs 150x120 random images.", "",
        markdown_table(["model", "backend", "latency b=1 (ms)", f"model only b={args.batch} (img/s)",
                        f"end to end b={args.batch} (img/s)", "min cos vs torch"], rows), "",
        "'model only' runs the backend on an already preprocessed batch; 'end to end' is Embedder.embed on PIL "
        "images (resize, crop, normalise, then the model). Torch runs twice: with its default intra-op thread "
        "count and with one thread (on a machine whose cores are busy with other work, spinning OpenMP workers "
        "can make the multi-threaded run far slower).", ""])
    print(text)
    atomic_write_text(args.out, text)
    atomic_write_json(args.out.with_suffix(".json"), {"machine": m, "results": record})


if __name__ == "__main__":
    main()
