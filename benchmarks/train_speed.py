"""Trainer overhead: images/s of Trainer.train_step on pre-made batches over a bare forward/backward/step loop of the
same model, batch, loss, optimizer and AMP settings (target ratio >= 0.95); on CUDA also fp16 vs bf16.

    python benchmarks/train_speed.py                 # CUDA: ResNet-50, 224 px, batch 128; CPU: ResNet-18, 112 px, 32
    python benchmarks/train_speed.py --dry-run       # tiny sizes, checks the code path

Both sides get the same batch already on the device (channels_last on CUDA) and the hybrid loss in float32; the
trainer adds what it always does per step (autocast, the float32 cast, one .item() for the NaN check, GradScaler
bookkeeping); the bare loop never synchronises. Blocks of --steps steps are interleaved (the order rotates each
repetition) and the median images/s per variant is reported, with the median of the per-repetition ratios.
Writes benchmarks/results/train_speed_<device>.md (+ .json), and the same under $OUT when set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, median, pick, report, set_cpu_threads, sync, timed


def trainer_config(device: torch.device, backbone: str, batch: int, size: int, amp: str, compile_: bool):
    from ctxsim.config import resolve_config

    m = max(2, batch // 4)  # 4 classes a batch (the digits dataset behind the unused loader has 5 train classes)
    return resolve_config(overrides={
        "device": str(device), "amp": amp, "compile": compile_, "channels_last": True, "epochs": 1,
        "model": {"backbone": backbone, "embedding_dim": 512, "pretrained": None},
        "preprocess": {"input_size": size, "resize_size": size},
        "data": {"dataset": "digits", "batch_size": batch, "m": m, "batches_per_epoch": 1}})


def make_trainer(cfg, tmp: Path):
    from ctxsim.train import Trainer

    trainer = Trainer(cfg, tmp / "run")
    trainer.model.train()
    return lambda x, y: trainer.train_step(x, y)


def make_bare(cfg, device: torch.device):
    """The same network, loss and optimizer, written as the shortest correct loop."""
    from ctxsim.losses import build_loss
    from ctxsim.nets import EmbeddingNet
    from ctxsim.train import amp_dtype

    torch.manual_seed(cfg.seed)
    model = EmbeddingNet(cfg.model).to(device)
    cuda = device.type == "cuda"
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.backbone.compile()
    model.train()
    loss_fn = build_loss(cfg.loss.name, **cfg.loss.params).to(device)
    o = cfg.optim
    opt = torch.optim.Adam([{"params": model.backbone_parameters(), "lr": o.lr * o.backbone_lr_scale},
                            {"params": model.head_parameters(), "lr": o.lr}], weight_decay=o.weight_decay,
                           **({"fused": True} if cuda else {}))
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            emb = model(x)
        loss = loss_fn(emb.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default=None, help="default: resnet50 on CUDA, resnet18 on CPU")
    ap.add_argument("--size", type=int, default=None, help="default: 224 on CUDA, 112 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 32 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed block (default: CUDA 10, CPU 1)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default: CUDA 7, CPU 5)")
    ap.add_argument("--compile", action="store_true", help="compile the backbone on both sides (cfg.compile)")
    ap.add_argument("--no-amp-compare", action="store_true", help="CUDA: skip the fp16 vs bf16 comparison")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (resnet18, 64 px, batch 16) to check the code")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 1, see benchmarks/common.py)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = ap.parse_args(argv)
    device = pick(a.device)
    set_cpu_threads(device, a.threads)
    cuda = device.type == "cuda"
    backbone = a.backbone or ("resnet50" if cuda else "resnet18")
    size = a.size or (224 if cuda else 112)
    batch = a.batch or (128 if cuda else 32)
    steps = a.steps or (10 if cuda else 1)
    reps = a.reps or (7 if cuda else 5)
    if a.dry_run:
        backbone, size, batch, steps, reps = "resnet18", 64, 16, 1, 2

    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="train_speed_"))
    default_amp = "bf16" if cuda else "off"
    label = "bf16" if cuda else "fp32"
    variants: dict[str, object] = {}
    cfg = trainer_config(device, backbone, batch, size, default_amp, a.compile)
    variants[f"Trainer.train_step ({label})"] = make_trainer(cfg, tmp)
    variants[f"bare loop ({label})"] = make_bare(cfg, device)
    if cuda and not a.no_amp_compare:
        cfg16 = trainer_config(device, backbone, batch, size, "fp16", a.compile)
        variants["Trainer.train_step (fp16)"] = make_trainer(cfg16, tmp / "fp16")
        variants["bare loop (fp16)"] = make_bare(cfg16, device)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(4).repeat_interleave(batch // 4).to(device)
    for fn in variants.values():  # warm-up (cuDNN autotuning, allocator, compile)
        for _ in range(2 if not a.dry_run else 1):
            fn(x, y)
    sync(device)

    names = list(variants)
    ips: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate to spread drift evenly
        for n in order:
            fn = variants[n]
            ips[n].append(batch * steps / timed(lambda: fn(x, y), device, steps) / steps)

    base = f"bare loop ({label})"
    ref = f"Trainer.train_step ({label})"
    ratio = median([t / b for t, b in zip(ips[ref], ips[base])])
    rows, data_rows = [], []
    for n in names:
        bare = "bare loop (" + n.split("(")[1]
        r = median([t / b for t, b in zip(ips[n], ips[bare])])
        rows.append([n, f"{median(ips[n]):.1f}", f"{r:.3f}"])
        data_rows.append({"variant": n, "images_per_s": median(ips[n]), "vs_bare_same_amp": r, "raw": ips[n]})
    extra = []
    if cuda and not a.no_amp_compare:
        f16 = median([a_ / b_ for a_, b_ in zip(ips["Trainer.train_step (fp16)"], ips[ref])])
        extra.append(f"fp16 / bf16 images/s (trainer): {f16:.3f}")
    settings = (f"{backbone}, {size} px, batch {batch}, hybrid loss (fp32), Adam"
                + (" fused, channels_last, cuDNN benchmark" if cuda else "")
                + (", compiled backbone" if a.compile else ""))
    md = "\n".join([
        f"**Trainer vs bare loop on {device.type}: {settings}**", "",
        f"Machine: {machine(device)}. {reps} interleaved repetitions of {steps} steps; medians.", "",
        markdown_table(["variant", "images/s", "vs bare loop (same AMP)"], rows), "",
        f"Trainer / bare: **{ratio:.3f}** (target >= 0.95)." + ("  " + "; ".join(extra) if extra else ""),
    ])
    data = {"device": device.type, "machine": machine(device), "backbone": backbone, "size": size, "batch": batch,
            "steps": steps, "reps": reps, "ratio": ratio, "rows": data_rows}
    return report("train_speed", device, md, data, a.out, a.dry_run)


if __name__ == "__main__":
    main()
