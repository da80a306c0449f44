"""The Trainer: m-per-class batches, the chosen loss, AMP, schedules, evaluation, atomic checkpoints, exact resume, DDP.

API: ``Trainer`` (``train_step``: one optimisation step, also used by benchmarks/train_speed.py; ``fit``;
``evaluate``), ``train`` / ``resume`` / ``check_config``. On CUDA the network runs under bf16 autocast in
channels_last (the backbone compiled with ``compile: true``) with a fused Adam/AdamW; the loss always runs in
float32; the one host sync per step is the NaN check's ``.item()``. Under torchrun every rank trains on its chunk
of the global batch and the loss sees the whole batch (``ctxsim.distributed``); rank 0 alone writes, evaluates and
broadcasts its record (docs/DISTRIBUTED.md). ``checkpoints/last.safetensors`` (weights, trainer state, sha256) is
the one commit point of an epoch; ``best.safetensors`` and ``metrics.jsonl`` are repaired from it on resume, so a
run killed anywhere resumes exactly or refuses with one line (docs/RELIABILITY.md).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
import torch
import yaml

from ctxsim import distributed as dist_utils
from ctxsim.config import TrainConfig, config_from_dict, load_yaml
from ctxsim.errors import ArtifactError, ConfigError, DataError, TrainingDiverged
from ctxsim.io import atomic_path, atomic_write_safetensors, atomic_write_text, read_json, sweep_stale_temps
from ctxsim.losses import build_loss
from ctxsim.losses import get_loss_class as build_loss_class
from ctxsim.nets import EmbeddingNet, load_weights_file, save_model
from ctxsim.runs import evaluate_model

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["CHECKPOINT_FORMAT", "Callback", "Checkpoint", "RunResult", "Trainer", "amp_dtype", "check_config",
           "pick_device", "read_best", "read_checkpoint", "read_history", "resume", "seed_everything", "train",
           "write_checkpoint"]

log = logging.getLogger(__name__)
Callback = Callable[..., None]  # callback(event: str, **info)

LAST, BEST = "last.safetensors", "best.safetensors"   # in run_dir/checkpoints
CHECKPOINT_FORMAT = "ctxsim-checkpoint-2"
_STATE_KEY = "__ctxsim_trainer_state__"                 # the trainer state: torch.save bytes as a uint8 tensor
_LEGACY_STATE, _LEGACY_BEST = "last.state.pt", "best.json"  # the old two-file layout, read for resume
_SHA_PLACEHOLDER = "0" * 64


@dataclass
class Checkpoint:
    """A verified last checkpoint: the weights and the trainer state of the same epoch."""
    epoch: int
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]   # optimizer, scheduler, scaler, loss, loss_optimizer, history, best
    legacy: bool = False    # read from the old last.safetensors + last.state.pt pair


def _split_header(data: bytes | memoryview, path: Path) -> tuple[int, dict[str, Any]]:
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            raise ValueError("header longer than the file")
        header = json.loads(bytes(data[8:8 + n]))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return n, header
    except (struct.error, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file ({e}); it is damaged") from None


def write_checkpoint(path: str | Path, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write one safetensors file, atomically: ``weights``, ``state`` (torch.save bytes as a uint8 tensor) and, in
    its metadata, the format, ``state["epoch"]`` and the sha256 of its data section."""
    buf = io.BytesIO()
    torch.save(state, buf)
    tensors = {**weights, _STATE_KEY: torch.frombuffer(buf.getbuffer(), dtype=torch.uint8)}
    meta = {"format": CHECKPOINT_FORMAT, "epoch": str(int(state["epoch"])), "sha256": _SHA_PLACEHOLDER}
    data = memoryview(safetensors.torch.save(tensors, meta))
    del tensors
    n, _ = _split_header(data, Path(path))
    header = bytes(data[8:8 + n])
    placeholder = f'"sha256":"{_SHA_PLACEHOLDER}"'.encode()
    if header.count(placeholder) != 1:
        raise RuntimeError("unexpected safetensors header layout")  # a bug, not a user error
    digest = hashlib.sha256(data[8 + n:]).hexdigest()
    header = header.replace(placeholder, f'"sha256":"{digest}"'.encode())  # same length: offsets unchanged
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in (data[:8], header, data[8 + n:]):
            f.write(chunk)


def read_checkpoint(run_dir: str | Path) -> Checkpoint:
    """Read and verify ``run_dir/checkpoints/last.safetensors`` (or the old two-file layout).

    Raises ArtifactError (one line) for a missing, damaged or inconsistent checkpoint.
    """
    run_dir = Path(run_dir)
    ck = run_dir / "checkpoints"
    path = ck / LAST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{run_dir} has no complete checkpoint (checkpoints/{LAST}) to resume from; "
                            "start the run again with `ctxsim train`") from None
    n, header = _split_header(data, path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != CHECKPOINT_FORMAT:
        return _read_legacy_checkpoint(run_dir, data, meta)
    if hashlib.sha256(memoryview(data)[8 + n:]).hexdigest() != meta.get("sha256"):
        raise ArtifactError(f"{path} is damaged (its data does not match its sha256); "
                            "restore it from a copy or start the run again")
    try:
        tensors = safetensors.torch.load(data)
        blob = tensors.pop(_STATE_KEY)
        state = torch.load(io.BytesIO(blob.numpy().tobytes()), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the readers raise, the checkpoint is damaged
        raise ArtifactError(f"{path} is damaged ({e.__class__.__name__}); restore it from a copy or start the run "
                            "again") from None
    try:
        epoch = int(state["epoch"])
        consistent = (str(epoch) == meta.get("epoch")
                      and [r["epoch"] for r in state["history"]] == list(range(1, epoch + 1)))
    except (KeyError, TypeError, ValueError):
        epoch, consistent = -1, False
    if not consistent:
        raise ArtifactError(f"{path} is inconsistent (its header, state and history disagree on the epoch); "
                            "restore it from a copy or start the run again")
    return Checkpoint(epoch, tensors, state)


def _read_legacy_checkpoint(run_dir: Path, data: bytes, meta: dict[str, str]) -> Checkpoint:
    """The old layout: last.safetensors (weights, metadata epoch) + last.state.pt, history in metrics.jsonl,
    best in best.json + best.safetensors. Accepted only when all agree; they were not written as one unit."""
    ck = run_dir / "checkpoints"
    refuse = (f"{ck} holds an old-layout checkpoint from an interrupted write ({{}}); it cannot be resumed "
              "exactly: start the run again with `ctxsim train`")
    if not (ck / _LEGACY_STATE).exists():
        raise ArtifactError(refuse.format(f"{LAST} without {_LEGACY_STATE}"))
    try:
        weights = safetensors.torch.load(data)
        state = torch.load(ck / _LEGACY_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the readers raise, the checkpoint is damaged
        raise ArtifactError(f"{ck} holds a damaged old-layout checkpoint ({e.__class__.__name__}); "
                            "start the run again with `ctxsim train`") from None
    epoch = int(state["epoch"])
    if meta.get("epoch") != str(epoch):
        raise ArtifactError(refuse.format(f"{LAST} is epoch {meta.get('epoch')}, {_LEGACY_STATE} epoch {epoch}"))
    try:
        history = [r for r in read_history(run_dir) if r["epoch"] <= epoch]
    except (ValueError, KeyError, TypeError):
        history = []
    if [r["epoch"] for r in history] != list(range(1, epoch + 1)):
        raise ArtifactError(refuse.format(f"metrics.jsonl does not hold epochs 1-{epoch}"))
    best: dict[str, Any] | None = None
    if (ck / _LEGACY_BEST).exists():
        try:
            b = read_json(ck / _LEGACY_BEST)
            best = {"epoch": int(b["epoch"]), "metric": str(b["metric"]), "value": float(b["value"])}
        except (ArtifactError, KeyError, TypeError, ValueError):
            best = None
        if best is None or best["epoch"] > epoch or _best_meta(ck / BEST).get("epoch") != str(best["epoch"]):
            raise ArtifactError(refuse.format(f"{_LEGACY_BEST} does not match {BEST} and {LAST}"))
    return Checkpoint(epoch, weights, {**state, "history": history, "best": best}, legacy=True)


def _best_meta(path: Path) -> dict[str, str]:
    """The metadata of a best.safetensors, {} when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head)
            return json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, struct.error, ValueError):
        return {}


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """``{"epoch", "metric", "value"}`` of ``checkpoints/best.safetensors`` (the best R@1 so far), or None."""
    meta = _best_meta(Path(run_dir) / "checkpoints" / BEST)
    if not {"epoch", "metric", "value"} <= meta.keys():
        return None
    return {"epoch": int(meta["epoch"]), "metric": meta["metric"], "value": float(meta["value"])}


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
        fused = True if self.device.type == "cuda" else None  # None: torch's default implementation
        self.optimizer = opt_cls(groups, weight_decay=o.weight_decay, fused=fused)
        self.loss_optimizer = (torch.optim.Adam(self.loss.parameters(), lr=cfg.loss.lr, weight_decay=1e-4, fused=fused)
                               if getattr(self.loss, "uses_proxies", False) else None)
        self.scheduler = self._scheduler()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.epoch = 0
        self.step_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # {"epoch", "metric", "value"} of the best R@1 so far
        self.tb: SummaryWriter | None = None

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
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    def _save_checkpoint(self) -> None:
        """The end of an epoch's one commit point: weights + trainer state + history + best record, one file."""
        ck = self.run_dir / "checkpoints"
        state = {"epoch": self.epoch, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "loss": self.loss.state_dict(),
                 "loss_optimizer": self.loss_optimizer.state_dict() if self.loss_optimizer else None,
                 "history": self.history, "best": self.best}
        write_checkpoint(ck / LAST, self._weights(), state)
        for name in (_LEGACY_STATE, _LEGACY_BEST):  # an old-layout run resumed: its pair is superseded now
            (ck / name).unlink(missing_ok=True)

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def _save_best(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        b = self.best
        assert b is not None, "no best epoch to save yet"
        atomic_write_safetensors(self.run_dir / "checkpoints" / BEST, weights or self._weights(),
                                 {"epoch": str(b["epoch"]), "metric": b["metric"], "value": repr(b["value"])})

    def _track_best(self, record: dict[str, Any]) -> bool:
        """Note the best R@1 so far: on the validation classes when the run has them, else on the test classes
        (what the paper's scripts do; prefer data.val_classes > 0). True when this epoch is the new best."""
        key = "val/R@1" if "val/R@1" in record else "test/R@1"
        if key not in record or (self.best is not None and record[key] <= self.best["value"]):
            return False
        self.best = {"epoch": self.epoch, "metric": key, "value": float(record[key])}
        return True

    def load_checkpoint(self) -> None:
        """Restore the last checkpoint (verified) and repair what is derived from it (best, metrics.jsonl)."""
        c = read_checkpoint(self.run_dir)
        state = c.state
        try:
            self.model.load_state_dict(c.weights)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.loss.load_state_dict(state["loss"])
            if self.loss_optimizer and state["loss_optimizer"]:
                self.loss_optimizer.load_state_dict(state["loss_optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ArtifactError(f"{self.run_dir / 'checkpoints' / LAST} does not fit this run's config.yaml "
                                f"({str(e).splitlines()[0]}); resume with the config it was trained with") from None
        self.epoch = c.epoch
        self.history = list(state["history"])
        self.best = state["best"]
        if self.is_main:
            self._repair(c)

    def _repair(self, c: Checkpoint) -> None:
        """After a kill between the commit and the derived files: rewrite metrics.jsonl from the checkpoint's
        history and best.safetensors from its best record; remove temporaries of killed writes."""
        ck = self.run_dir / "checkpoints"
        self._write_metrics()
        if self.best is not None:
            meta = _best_meta(ck / BEST)
            want = {"epoch": str(self.best["epoch"]), "metric": self.best["metric"], "value": repr(self.best["value"])}
            if meta != want:
                if self.best["epoch"] == c.epoch:        # killed before best.safetensors of this epoch was written
                    self._save_best(c.weights)
                elif meta.get("epoch") == want["epoch"]:  # old layout: same weights, metadata of this version
                    self._save_best(safetensors.torch.load_file(str(ck / BEST)))
                else:
                    log.warning("%s does not hold the best epoch %d; it is rewritten at the next improvement",
                                ck / BEST, self.best["epoch"])
        for folder in (ck, self.run_dir):
            sweep_stale_temps(folder)

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
                improved = self._track_best(record)
                self._save_checkpoint()          # the commit; best and metrics follow from it
                if improved:
                    self._save_best()
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
    if (run_dir / "checkpoints" / LAST).exists():
        raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    trainer = Trainer(cfg, run_dir, callback, weights)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def check_config(cfg: TrainConfig, weights: str | Path | None = None) -> float:
    """Build everything training needs (data, model, loss, optimiser) and run one step; write nothing.

    What ``ctxsim train --check`` runs: a config that passes is one that trains. Returns the step's loss."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ctxsim-check-") as tmp:
        trainer = Trainer(cfg, tmp, None, weights)
        try:
            trainer.data.sampler.set_epoch(0)
            trainer.model.train()
            batch = next(iter(trainer.data.loader), None)
            if batch is None:
                raise DataError("the training data yields no batch; lower data.batch_size or add images")
            x, y = batch
            if trainer.data.augment is not None:
                x = trainer.data.augment(x)
            return trainer.train_step(x, y)
        finally:
            trainer.close()


def resume(run_dir: str | Path, callback: Callback | None = None, epochs: int | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint, with its saved config (optionally more epochs)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ArtifactError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = config_from_dict(load_yaml(run_dir / "config.yaml"))
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
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
