"""What the hybrid (contextual) loss costs: its forward+backward time at batch 128/256/512 (embedding dim 512)
as a fraction of one ResNet-50 training step (forward+backward+optimizer) at batch 128 on the same machine.

    python benchmarks/loss_cost.py                  # CPU here, CUDA when visible (--device cpu|cuda)
    python benchmarks/loss_cost.py --dry-run        # tiny sizes, checks the code path in seconds

The step is the trainer's network (EmbeddingNet: ResNet-50 -> max pool -> LayerNorm -> linear 512 -> L2) with
Adam, on CUDA under bf16 autocast in channels_last with fused Adam (the trainer's settings); its loss is a
trivial sum so the step excludes the metric loss. The hybrid loss runs in float32 as in training. On the CPU
the step uses 224 px if one step takes under --max-step-s seconds (default 20), else the largest smaller size
that does, estimated from a 48-px probe (the table says which). Measurements are interleaved (step, then each loss batch, repeated) and the median is reported.
Writes benchmarks/results/loss_cost_<device>.md (+ .json), and the same under $OUT when set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import calls_for, machine, markdown_table, median, pick, report, set_cpu_threads, sync, timed


def make_step(backbone: str, batch: int, size: int, device: torch.device):
    from ctxsim.nets import EmbeddingNet
    from ctxsim.nets.embedding import ModelSpec

    model = EmbeddingNet(ModelSpec(backbone=backbone, embedding_dim=512, pooling="max")).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, **({"fused": True} if cuda else {}))
    x = torch.randn(batch, 3, size, size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            emb = model(x)
        opt.zero_grad(set_to_none=True)
        emb.float().sum().backward()
        opt.step()

    return step


def make_loss(batch: int, dim: int, device: torch.device, m: int = 4):
    from ctxsim.losses import HybridLoss

    loss_fn = HybridLoss().to(device)
    g = torch.Generator(device="cpu").manual_seed(batch)
    emb = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device).requires_grad_()
    labels = torch.arange(batch // m).repeat_interleave(m).to(device)

    def run():
        loss = loss_fn(emb, labels)
        loss.backward()
        emb.grad = None

    return run


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch", type=int, default=128, help="batch of the network step")
    ap.add_argument("--size", default="auto", help="image side in px; auto = 224 (CPU: 112 when a step is slow)")
    ap.add_argument("--max-step-s", type=float, default=20.0)
    ap.add_argument("--loss-batches", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default: CPU 3, CUDA 7)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (resnet18, 64 px, batch 8) to check the code")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 1, see benchmarks/common.py)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = ap.parse_args(argv)
    device = pick(a.device)
    set_cpu_threads(device, a.threads)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    if a.dry_run:
        a.backbone, a.batch, a.size, a.loss_batches, a.reps = "resnet18", 8, "64", [16, 32], 1
    reps = a.reps or (7 if cuda else 3)
    target = 0.5 if cuda else 0.0  # seconds per measurement (CPU: one call is long enough)

    note = ""
    if a.size == "auto" and not cuda:
        # a ResNet-50 step at 224 px may take minutes on a small CPU: probe a small size, scale by pixels and
        # take the largest size whose estimated step fits --max-step-s
        probe = 48
        step = make_step(a.backbone, a.batch, probe, device)
        timed(step, device)
        t_probe = min(timed(step, device), timed(step, device))
        ladder = [224, 192, 160, 128, 112, 96, 80, 64, 48]
        size = next((s for s in ladder if t_probe * (s / probe) ** 2 <= a.max_step_s), probe)
        if size != 224:
            note = (f"a 224 px step would take about {t_probe * (224 / probe) ** 2:.0f} s here (scaled from "
                    f"{t_probe:.1f} s at {probe} px) > {a.max_step_s:g} s, so the step is measured at {size} px")
        if size != probe:
            del step
            step = make_step(a.backbone, a.batch, size, device)
            timed(step, device)
    else:
        size = 224 if a.size == "auto" else int(a.size)
        step = make_step(a.backbone, a.batch, size, device)
        timed(step, device)
    losses = {b: make_loss(b, a.dim, device) for b in a.loss_batches}
    for fn in losses.values():  # warm-up
        timed(fn, device)

    n_step = calls_for(timed(step, device), target) if cuda else 1
    n_loss = {b: calls_for(timed(fn, device), max(target, 0.5)) for b, fn in losses.items()}
    t_step: list[float] = []
    t_loss: dict[int, list[float]] = {b: [] for b in losses}
    for _ in range(reps):  # interleaved
        t_step.append(timed(step, device, n_step))
        for b, fn in losses.items():
            t_loss[b].append(timed(fn, device, n_loss[b]))
    sync(device)

    step_s = median(t_step)
    prec = "bf16 autocast, channels_last, fused Adam" if cuda else "fp32"
    rows, data_rows = [], []
    for b in losses:
        s = median(t_loss[b])
        rows.append([b, f"{s * 1e3:.2f}", f"{step_s * 1e3:.1f}", f"{100 * s / step_s:.2f} %"])
        data_rows.append({"loss_batch": b, "loss_ms": s * 1e3, "step_ms": step_s * 1e3, "share": s / step_s})
    title = (f"Hybrid loss (fp32, dim {a.dim}) forward+backward vs one {a.backbone} training step "
             f"(batch {a.batch}, {size} px, {prec}) on {device.type}")
    md = "\n".join([
        f"**{title}**", "",
        f"Machine: {machine(device)}. Median of {reps} interleaved repetitions.",
        *( [f"Note: {note}."] if note else []), "",
        markdown_table(["loss batch", "hybrid loss fwd+bwd (ms)", f"{a.backbone} step, batch {a.batch} (ms)",
                        "loss / step"], rows),
    ])
    data = {"device": device.type, "machine": machine(device), "backbone": a.backbone, "batch": a.batch,
            "size": size, "note": note, "reps": reps, "precision": prec, "rows": data_rows,
            "raw": {"step_s": t_step, "loss_s": {str(b): v for b, v in t_loss.items()}}}
    return report("loss_cost", device, md, data, a.out, a.dry_run)


if __name__ == "__main__":
    main()
