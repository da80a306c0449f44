"""GPU inference of the embedding network: PyTorch eager bf16 vs torch.compile(mode="max-autotune") (Inductor with
CUDA graphs) in bf16, ResNet-50 at 224 px: throughput at batch 256 and latency at batch 1, with an embedding-level
parity check (cosine to an fp32 eager reference). Targets: >= 2x eager throughput at 256, <= 1/3 eager latency at 1.

    python benchmarks/gpu_inference.py               # on CUDA (part of benchmarks/gpu_check.sh)
    python benchmarks/gpu_inference.py --dry-run     # CPU, tiny, no compile: checks the code path

The network is ctxsim's EmbeddingNet (ResNet-50 -> max pool -> LayerNorm -> linear 512 -> L2), random weights
with BatchNorm statistics calibrated on random images (no download needed; speed does not depend on the values).
Both rows are the product's own code: bf16 is ``ctxsim.deploy.embedder.set_precision`` (backbone and pooling
weights and activations in bfloat16, channels_last; the head float32), what ``Embedder``/``ctxsim serve
--precision bf16`` run; the compiled row (``--mode serving``, the default) is ``compile_for_inference``, what
``--compile`` runs: Inductor's max-autotune (CUDA graphs) with freezing (BatchNorm folded into the convolutions),
convolutions tuned over cuDNN only (--conv-backends ATEN). ``--mode X`` compiles with torch.compile(mode=X)
instead; ``--mode none`` skips compiling.
Writes gpu_inference_<device>.md/.json under benchmarks/results and $OUT.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import calls_for, machine, markdown_table, median, pick, report, set_cpu_threads, sync, timed


def build(backbone: str, device: torch.device, size: int, in_ch: int = 3):
    from ctxsim.nets import EmbeddingNet
    from ctxsim.nets.embedding import ModelSpec

    torch.manual_seed(0)
    model = EmbeddingNet(ModelSpec(backbone=backbone, embedding_dim=512, pooling="max", frozen_bn=False,
                                   in_channels=in_ch)).to(device)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, in_ch, size, size, device=device))
    return model.eval()


def latency(fn, x, device: torch.device, calls: int) -> list[float]:
    """Per-call wall time (synchronised after each call), in seconds."""
    out = []
    for _ in range(calls):
        sync(device)
        t0 = time.perf_counter()
        fn(x)
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--latency-calls", type=int, default=100)
    ap.add_argument("--mode", default="serving",
                    help='"serving" (compile_for_inference), a torch.compile mode, or "none" to skip compiling')
    ap.add_argument("--conv-backends", default="ATEN", help="Inductor max_autotune_conv_backends")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, no compile (checks the code on a CPU)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = pick(a.device)
    set_cpu_threads(device, a.threads)
    cuda = device.type == "cuda"
    if a.dry_run:  # the CPU takes compile_for_inference's CPU branch (plain torch.compile)
        a.backbone, a.size, a.batch, a.reps, a.latency_calls = "convnet", 32, 8, 2, 3
    if cuda:
        torch.backends.cudnn.benchmark = True
    dt = torch.bfloat16

    from ctxsim.deploy.embedder import compile_for_inference, set_precision

    in_ch = 1 if a.backbone == "convnet" else 3
    ref = build(a.backbone, device, a.size, in_ch)                # fp32 eager reference
    eager = copy.deepcopy(ref)
    set_precision(eager, "bf16")                                  # as Embedder(precision="bf16") does

    compiled, compile_s = eager, {}
    if a.mode == "serving":
        compiled = compile_for_inference(copy.deepcopy(eager), device, a.conv_backends)
    elif a.mode != "none":
        compiled = torch.compile(copy.deepcopy(eager), mode=a.mode, dynamic=False)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return x.to(dt).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()  # as Embedder.run
    def run_eager(x):
        return eager(x)

    @torch.inference_mode()  # as Embedder.run
    def run_compiled(x):
        return compiled(x)

    g = torch.Generator().manual_seed(1)
    xb = prep(torch.randn(a.batch, in_ch, a.size, a.size, generator=g).to(device))
    x1 = prep(torch.randn(1, in_ch, a.size, a.size, generator=g).to(device))
    for name, x in (("batch", xb), ("one", x1)):  # compile (and autotune) each shape; CUDA graphs record here
        t0 = time.perf_counter()
        for _ in range(3):
            run_compiled(x)
        sync(device)
        compile_s[name] = time.perf_counter() - t0
        run_eager(x)
    sync(device)

    # parity on a.batch images (the shape already compiled): cosine of each embedding to the fp32 reference
    xp = torch.randn(a.batch, in_ch, a.size, a.size, generator=g).to(device)
    with torch.inference_mode():
        e_ref = ref(xp).float()
        e_eager = run_eager(prep(xp)).float()
        e_comp = run_compiled(prep(xp)).float().clone()  # CUDA-graph outputs are reused by the next replay
    cos_eager = F.cosine_similarity(e_eager, e_ref, dim=1)
    cos_comp = F.cosine_similarity(e_comp, e_ref, dim=1)

    # throughput at a.batch, interleaved
    n_e = calls_for(timed(lambda: run_eager(xb), device), 0.5 if cuda else 0.0)
    n_c = calls_for(timed(lambda: run_compiled(xb), device), 0.5 if cuda else 0.0)
    thr = {"eager": [], "compiled": []}
    lat = {"eager": [], "compiled": []}
    for _ in range(a.reps):
        thr["eager"].append(a.batch / timed(lambda: run_eager(xb), device, n_e))
        thr["compiled"].append(a.batch / timed(lambda: run_compiled(xb), device, n_c))
        lat["eager"] += latency(run_eager, x1, device, a.latency_calls // a.reps + 1)
        lat["compiled"] += latency(run_compiled, x1, device, a.latency_calls // a.reps + 1)

    te, tc = median(thr["eager"]), median(thr["compiled"])
    le, lc = median(lat["eager"]), median(lat["compiled"])
    speedup, lat_ratio = tc / te, lc / le
    ok_parity = float(cos_comp.min()) >= 0.99
    label = {"serving": "compile_for_inference bf16 (ctxsim serve --compile)", "none": "eager again (no compile)"
             }.get(a.mode, f'torch.compile("{a.mode}") bf16')
    rows = [
        ["PyTorch eager bf16", f"{te:.0f}", f"{le * 1e3:.3f}", f"{float(cos_eager.min()):.5f}",
         f"{float(cos_eager.mean()):.5f}"],
        [label, f"{tc:.0f}", f"{lc * 1e3:.3f}", f"{float(cos_comp.min()):.5f}", f"{float(cos_comp.mean()):.5f}"],
    ]
    md = "\n".join([
        f"**Inference, {a.backbone} embedding net at {a.size} px on {device.type}**", "",
        f"Machine: {machine(device)}. Median of {a.reps} interleaved throughput blocks and "
        f"{len(lat['eager'])} synchronised batch-1 calls.", "",
        markdown_table(["engine", f"images/s at batch {a.batch}", "batch-1 latency (ms)",
                        "min cosine to fp32", "mean cosine to fp32"], rows), "",
        f"Compiled / eager throughput: **{speedup:.2f}x** (target >= 2x); batch-1 latency compiled / eager: "
        f"**{lat_ratio:.2f}** (target <= 0.33); parity (min cosine >= 0.99): {'pass' if ok_parity else 'FAIL'}. "
        f"Compile + autotune time: {compile_s.get('batch', 0):.0f} s (batch {a.batch}), "
        f"{compile_s.get('one', 0):.0f} s (batch 1); conv backends {a.conv_backends}.",
    ])
    data = {"device": device.type, "machine": machine(device), "backbone": a.backbone, "size": a.size,
            "batch": a.batch, "mode": a.mode, "eager_ips": te, "compiled_ips": tc, "speedup": speedup,
            "eager_latency_ms": le * 1e3, "compiled_latency_ms": lc * 1e3, "latency_ratio": lat_ratio,
            "cos_min_eager": float(cos_eager.min()), "cos_min_compiled": float(cos_comp.min()),
            "parity_pass": ok_parity, "compile_s": compile_s}
    return report("gpu_inference", device, md, data, a.out, a.dry_run)


if __name__ == "__main__":
    main()
