"""The Trainer: m-per-class batches, the chosen loss, AMP, schedules, evaluation, atomic checkpoints, exact resume, DDP.

One optimisation step is :meth:`Trainer.train_step` (used by :meth:`Trainer.fit` and by benchmarks/train_speed.py).
On CUDA it runs the network under bf16 autocast (``amp: auto``) in channels_last layout, optionally with the backbone
compiled (``compile: true``), and a fused Adam/AdamW; the loss always runs in float32. The only host sync per step
is one ``.item()`` (after backward, before the optimizer step) for the NaN check.

Distributed data parallel (launched by torchrun; see ``ctxsim.distributed``): each rank trains on its contiguous
chunk of the global m-per-class batch, the loss sees the global batch (embeddings gathered, gradient kept on the
local chunk, loss scaled by the world size so DDP's mean all-reduce gives the single-process gradient). Rank 0
alone writes config, checkpoints, metrics and the final model, drives the callback and evaluates (the other ranks
wait for its record, which is broadcast so every rank returns the same RunResult). Model initialisation uses the
same seed on every rank (DDP also broadcasts rank 0's weights); the per-epoch augmentation seed is
``seed * 100003 + epoch + 1000003 * rank``, so ranks draw different augmentations and rank 0 draws what a single
process would.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from ctxsim import distributed as dist_utils
from ctxsim.config import TrainConfig, config_from_dict
from ctxsim.errors import ArtifactError, ConfigError, TrainingDiverged
from ctxsim.io import atomic_path, atomic_write_json, atomic_write_text, read_json
from ctxsim.losses import build_loss
from ctxsim.losses import get_loss_class as build_loss_class
from ctxsim.nets import EmbeddingNet, load_weights_file, save_model
from ctxsim.runs import evaluate_model

log = logging.getLogger(__name__)
Callback = Callable[..., None]  # callback(event: str, **info)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]       # last evaluation on the held-out (test) classes
    history: list[dict[str, Any]]   # every record of metrics.jsonl


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """The training device; under DDP (``local_rank`` given) a CUDA device is always ``cuda:local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA GPU is visible; use --set device=cpu")
    device = torch.device(name)
    if device.type == "cuda" and local_rank is not None:
        if device.index not in (None, local_rank):
            log.warning("device %s ignored under DDP: rank uses cuda:%d (LOCAL_RANK)", name, local_rank)
        device = torch.device("cuda", local_rank)
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains an EmbeddingNet into a run folder; the same object resumes from that folder's last checkpoint.

    Under torchrun (``WORLD_SIZE > 1``) it joins the process group (NCCL on CUDA, gloo on the CPU) and trains
    with DistributedDataParallel; see the module docstring.
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, callback: Callback | None = None,
                 weights: str | Path | None = None):
        from ctxsim.data.pipeline import build_datasets

        self.cfg, self.run_dir = cfg, Path(run_dir)
        device = pick_device(cfg.device)
        self.dist = dist_utils.init_from_env(device.type)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.rank == 0
        if self.dist.distributed:
            device = pick_device(cfg.device, self.dist.local_rank)
        self.device = device
        # only rank 0 reports progress
        self.callback = (callback if self.is_main else None) or (lambda event, **info: None)
        self.amp = amp_dtype(cfg.amp, self.device)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed m-per-class batch shapes: pick the fastest kernels once
        seed_everything(cfg.seed)  # the same on every rank: identical initial weights

        self.data = build_datasets(cfg, rank=self.rank, world_size=self.world_size, device=self.device)
        self.model = EmbeddingNet(cfg.model)
        if weights:
            load_weights_file(self.model.backbone, weights)
        if self.dist.distributed and self.device.type == "cuda" and not cfg.model.frozen_bn:
            # batch statistics over the global batch, as a single process would compute them
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        self.channels_last = self.device.type == "cuda" and cfg.channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.compile:
            self.model.backbone.compile()  # in place: state_dict keys (checkpoints, model.safetensors) unchanged
        self.ddp = None
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # a proxy loss's warm-up freezes the backbone (requires_grad False), so DDP must expect unused params
            find_unused = (getattr(build_loss_class(cfg.loss.name), "uses_proxies", False)
                           and cfg.loss.warmup_epochs > 0)
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused, gradient_as_bucket_view=True)
        self.forward = self.ddp if self.ddp is not None else self.model

        self.loss = build_loss(cfg.loss.name, num_classes=self.data.train.num_classes,
                               embedding_dim=cfg.model.embedding_dim, **cfg.loss.params).to(self.device)
        if self.dist.distributed:  # loss parameters (proxies) live outside DDP: start them from rank 0's values
            dist_utils.broadcast_tensors(list(self.loss.parameters()) + list(self.loss.buffers()))
        self.target_lam = getattr(self.loss, "lam", None)
        o = cfg.optim
        groups = [{"params": self.model.backbone_parameters(), "lr": o.lr * o.backbone_lr_scale},
                  {"params": self.model.head_parameters(), "lr": o.lr}]
        opt_cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = opt_cls(groups, weight_decay=o.weight_decay, **fused)
        self.loss_optimizer = (torch.optim.Adam(self.loss.parameters(), lr=cfg.loss.lr, weight_decay=1e-4, **fused)
                               if getattr(self.loss, "uses_proxies", False) else None)
        self.scheduler = self._scheduler()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.epoch = 0
        self.step_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.tb = None

    def _scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        o, sched = self.cfg.optim, torch.optim.lr_scheduler
        if o.schedule == "multistep":
            return sched.MultiStepLR(self.optimizer, milestones=o.milestones, gamma=o.gamma)
        if o.schedule == "step":
            return sched.StepLR(self.optimizer, step_size=o.step_size, gamma=o.gamma)
        if o.schedule == "cosine":
            return sched.CosineAnnealingLR(self.optimizer, T_max=self.cfg.epochs)
        return sched.LambdaLR(self.optimizer, lambda _: 1.0)

    # ---- run folder -------------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def _write_metrics(self) -> None:
        import json

        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    def _save_checkpoint(self) -> None:
        ck = self.run_dir / "checkpoints"
        state = {"epoch": self.epoch, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "loss": self.loss.state_dict(),
                 "loss_optimizer": self.loss_optimizer.state_dict() if self.loss_optimizer else None}
        with atomic_path(ck / "last.state.pt") as tmp:
            torch.save(state, tmp)
        self._save_weights(ck / "last.safetensors")

    def _save_weights(self, path: Path) -> None:
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(weights, str(tmp), metadata={"epoch": str(self.epoch)})

    def _update_best(self, record: dict[str, Any]) -> None:
        """Keep checkpoints/best.safetensors at the best R@1 so far: on the validation classes when the run has
        them, else on the test classes (what the paper's scripts do; prefer data.val_classes > 0)."""
        key = "val/R@1" if "val/R@1" in record else "test/R@1"
        if key not in record:
            return
        best_file = self.run_dir / "checkpoints" / "best.json"
        best = read_json(best_file) if best_file.exists() else {"value": -1.0}
        if record[key] > best["value"]:
            self._save_weights(self.run_dir / "checkpoints" / "best.safetensors")
            atomic_write_json(best_file, {"epoch": self.epoch, "metric": key, "value": record[key]})

    def load_checkpoint(self) -> None:
        ck = self.run_dir / "checkpoints"
        if not (ck / "last.safetensors").exists():
            raise ArtifactError(f"{self.run_dir} has no checkpoints/last.safetensors to resume from")
        state = torch.load(ck / "last.state.pt", map_location=self.device, weights_only=True)
        weights = load_file(str(ck / "last.safetensors"))
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.loss.load_state_dict(state["loss"])
        if self.loss_optimizer and state["loss_optimizer"]:
            self.loss_optimizer.load_state_dict(state["loss_optimizer"])
        self.epoch = int(state["epoch"])
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():
            import json

            lines = metrics.read_text().splitlines()
            self.history = [r for r in map(json.loads, filter(None, lines)) if r["epoch"] <= self.epoch]

    # ---- training ---------------------------------------------------------------------------------------------
    def _set_warmup(self, progress: float) -> None:
        """Ramp the contextual weight in (hybrid) or keep the backbone still (proxy losses) during warm-up."""
        w = self.cfg.loss.warmup_epochs
        if w <= 0:
            return
        frac = min(1.0, progress / w)
        if self.target_lam is not None:
            self.loss.lam = self.target_lam * frac
        if self.loss_optimizer is not None:
            for p in self.model.backbone_parameters():
                p.requires_grad_(frac >= 1.0)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimisation step on a batch (this rank's chunk under DDP); returns the (global-batch) loss value.

        Raises TrainingDiverged, before the optimizer step, when the loss is not finite.
        """
        dev = self.device
        x = x.to(dev, non_blocking=True)
        y = y.to(dev, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=self.amp, enabled=self.amp is not None):
            emb = self.forward(x)
        emb = emb.float()                            # losses run in float32
        if self.world_size > 1:                      # the loss sees the global batch
            emb = dist_utils.all_gather_with_grad_on_local(emb)
            y = dist_utils.all_gather_no_grad(y)
        loss = self.loss(emb, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.loss_optimizer:
            self.loss_optimizer.zero_grad(set_to_none=True)
        # x world_size: DDP averages gradients over ranks, each rank holds its own share of dL/dtheta
        self.scaler.scale(loss * self.world_size if self.world_size > 1 else loss).backward()
        value = loss.item()                          # the one host sync per step
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss became {value} at epoch {self.epoch + 1} step {self.step_in_epoch}; the last good checkpoint "
                f"is kept in {self.run_dir / 'checkpoints'}; lower optim.lr or check the data")
        if self.loss_optimizer:
            dist_utils.unscale_local_grads(self.loss.parameters(), self.world_size)
        self.scaler.step(self.optimizer)
        if self.loss_optimizer:
            self.scaler.step(self.loss_optimizer)
        self.scaler.update()
        return value

    def train_epoch(self) -> dict[str, float]:
        cfg, data = self.cfg, self.data
        # per-epoch seed: resume replays the same augmentations; each rank draws its own
        torch.manual_seed(cfg.seed * 100_003 + self.epoch + 1_000_003 * self.rank)
        data.sampler.set_epoch(self.epoch)
        self.model.train()
        steps, total, seen, t0 = len(data.sampler), 0.0, 0, time.perf_counter()
        for step, (x, y) in enumerate(data.loader):
            self._set_warmup(self.epoch + step / steps)
            self.step_in_epoch = step + 1
            if data.augment is not None:             # data.decode=device: x is a list of encoded JPEGs
                x = data.augment(x)
            value = self.train_step(x, y)
            total += value
            seen += len(x) * self.world_size         # global images
            self.callback("step", epoch=self.epoch, step=step + 1, steps=steps, loss=value,
                          images_per_s=seen / max(time.perf_counter() - t0, 1e-9))
        self.scheduler.step()
        return {"loss": total / max(steps, 1), "images_per_s": seen / max(time.perf_counter() - t0, 1e-9)}

    def evaluate(self) -> dict[str, dict[str, float]]:
        out = {}
        for split, ds in self.data.eval_sets().items():
            out[split] = evaluate_model(self.model, ds, self.cfg.eval_ks, self.cfg.eval_batch_size, self.device,
                                        self.cfg.data.num_workers, self.amp)
        return out

    def fit(self) -> RunResult:
        """Train until cfg.epochs, evaluating every cfg.eval_every epochs; returns the final evaluation.

        Under DDP every rank trains; rank 0 evaluates and writes, and its records are broadcast to all ranks.
        """
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
        self.callback("start", epochs=self.cfg.epochs, start_epoch=self.epoch, steps=len(self.data.sampler),
                      device=str(self.device), train_images=len(self.data.train),
                      train_classes=self.data.train.num_classes, world_size=self.world_size)
        if self.cfg.tensorboard and self.tb is None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        last_eval: dict[str, float] = {}
        while self.epoch < self.cfg.epochs:
            stats = self.train_epoch()
            self.epoch += 1
            record: dict[str, Any] = {"epoch": self.epoch, **stats,
                                      "lr": self.optimizer.param_groups[1]["lr"]}
            evaluated = self.epoch % self.cfg.eval_every == 0 or self.epoch == self.cfg.epochs
            if evaluated and self.is_main:
                for split, metrics in self.evaluate().items():
                    record.update({f"{split}/{k}": v for k, v in metrics.items()})
                    if split == "test":
                        last_eval = metrics
            if self.world_size > 1:  # rank 0's record (with its evaluation) on every rank
                record, last_eval = dist_utils.broadcast_object((record, last_eval))
            if evaluated:
                self.callback("eval", epoch=self.epoch, record=record)
            self.history.append(record)
            if self.is_main:
                if self.tb:
                    for k, v in record.items():
                        self.tb.add_scalar(k, v, self.epoch)
                self._save_checkpoint()
                self._update_best(record)
                self._write_metrics()
            self.callback("epoch", epoch=self.epoch, record=record)
        if self.is_main:
            save_model(self.run_dir, self.model, self.cfg.preprocess)
        dist_utils.barrier()  # every rank returns once the run folder is complete
        self.callback("end", metrics=last_eval, run_dir=str(self.run_dir))
        return RunResult(self.run_dir, last_eval, self.history)

    def close(self) -> None:
        """Close TensorBoard and leave the process group if this trainer created it."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        dist_utils.shutdown(self.dist)


def train(cfg: TrainConfig, run_dir: str | Path, callback: Callback | None = None,
          weights: str | Path | None = None) -> RunResult:
    """Train a model from a resolved config into ``run_dir`` (config.yaml, model.safetensors, model.json, ...)."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints" / "last.safetensors").exists():
        raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    trainer = Trainer(cfg, run_dir, callback, weights)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def resume(run_dir: str | Path, callback: Callback | None = None, epochs: int | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint, with its saved config (optionally more epochs)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ArtifactError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    if epochs is not None:
        cfg.epochs = epochs
    trainer = Trainer(cfg, run_dir, callback)
    try:
        trainer.load_checkpoint()
        return trainer.fit()
    finally:
        trainer.close()


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
