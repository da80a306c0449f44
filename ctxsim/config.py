"""Typed training configuration: dataclass defaults, overridden by a recipe YAML, then by `key=value` options."""
from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from ctxsim.data.transforms import Preprocess
from ctxsim.errors import ConfigError
from ctxsim.nets.embedding import ModelSpec
from ctxsim.schema import check

__all__ = ["DataConfig", "LossConfig", "OptimConfig", "TrainConfig", "config_from_dict", "list_recipes", "load_yaml",
           "parse_set", "recipe_path", "resolve_config", "validate"]


@dataclass
class DataConfig:
    dataset: str = "digits"            # a name known to ctxsim.data.open_dataset
    root: str | None = None            # where the dataset lives (not needed for digits)
    test_classes: float = 0.5          # a dataset without a test split: fraction of classes held out for testing
    val_classes: float = 0.0           # fraction of training classes (super-classes when known) held out to validate
    # "hierarchical": two super-classes a batch, as the paper on SOP/iNat
    sampler: Literal["m_per_class", "hierarchical"] = "m_per_class"
    m: int = 4                         # images per class in a batch
    batch_size: int = 128
    batches_per_epoch: int | None = None  # default: training images // batch size
    num_workers: int = 0
    train_scale: tuple[float, float] = (0.16, 1.0)  # RandomResizedCrop scale range
    flip: bool = True
    on_error: Literal["raise", "skip"] = "raise"  # corrupt images: "raise" or "skip" (counted and reported)
    label_noise: float = 0.0           # fraction of training labels replaced at random (robustness studies)
    # training JPEGs: "loader" (Pillow in the DataLoader) or "device" (nvJPEG and augmentation on the training GPU;
    # ctxsim.data.device_decode)
    decode: Literal["loader", "device"] = "loader"


@dataclass
class LossConfig:
    name: str = "hybrid"
    params: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3                   # learning rate of a proxy loss's own parameters
    warmup_epochs: int = 0             # hybrid: contextual weight ramped in linearly; proxies: backbone frozen


@dataclass
class OptimConfig:
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4                   # head learning rate; the backbone gets lr * backbone_lr_scale
    backbone_lr_scale: float = 0.5     # the paper trains the backbone at half the head's rate
    weight_decay: float = 1e-4
    schedule: Literal["multistep", "step", "cosine", "none"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [15, 30, 45])
    step_size: int = 10
    gamma: float = 0.3


@dataclass
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    preprocess: Preprocess = field(default_factory=Preprocess.imagenet)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 5
    eval_every: int = 1
    eval_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    eval_batch_size: int = 256
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off on the CPU
    channels_last: bool = True         # on CUDA only
    compile: bool = False              # torch.compile the backbone
    tensorboard: bool = False

    def to_dict(self) -> dict:
        return _plain(asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _merge(target: Any, overrides: dict, where: str = "") -> Any:
    """Return a copy of dataclass ``target`` with ``overrides`` applied recursively; every value is checked against
    its field's type (ctxsim.schema), unknown keys are errors."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"the settings must be a mapping, got {overrides!r}")
    names = {f.name: f for f in fields(target)}
    hints = typing.get_type_hints(type(target))
    updates = {}
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"unknown setting '{where}{key}'; known: {', '.join(sorted(names))}")
        current = getattr(target, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"setting {where}{key} must be a mapping, got {value!r}")
            value = _merge(current, value, f"{where}{key}.")
        else:
            value = check(value, hints[key], f"{where}{key}", lenient=True)  # YAML reads 3e-4 as a string
        if key == "params" and isinstance(current, dict):
            # loss parameters merge while the loss stays the same; another loss starts from its own defaults
            same_loss = overrides.get("name", getattr(target, "name", None)) == getattr(target, "name", None)
            value = {**current, **value} if same_loss else value
        updates[key] = value
    if "name" in overrides and "params" not in overrides and overrides["name"] != getattr(target, "name", None):
        updates["params"] = {}  # a different loss: drop the previous loss's parameters
    try:
        return dataclasses.replace(target, **updates)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad value under {where or 'config'}: {e}") from None


def parse_set(items: list[str]) -> dict:
    """Turn ['optim.lr=3e-4', 'loss.params.k=8'] into a nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def recipe_path(name: str) -> Path:
    """A recipe shipped in ctxsim.models (by name) or a YAML file path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    shipped = resources.files("ctxsim.models") / f"{name}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"unknown recipe {name!r}; shipped recipes: {', '.join(list_recipes())}")


def list_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("ctxsim.models").iterdir() if p.name.endswith(".yaml"))


def load_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    data.pop("description", None)  # recipes carry a human description
    return data


def resolve_config(recipe: str | None = None, config_file: str | Path | None = None,
                   overrides: dict | None = None) -> TrainConfig:
    """Defaults <- recipe or config file <- overrides (e.g. from --set and --data)."""
    cfg = TrainConfig()
    for source in (recipe and recipe_path(recipe), config_file):
        if source:
            cfg = _merge(cfg, load_yaml(source))
    if overrides:
        cfg = _merge(cfg, copy.deepcopy(overrides))
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> TrainConfig:
    cfg = _merge(TrainConfig(), d)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Ranges and cross-field rules (types and option strings are checked as settings are merged)."""
    d, o, lo = cfg.data, cfg.optim, cfg.loss
    _at_least(("epochs", cfg.epochs, 1), ("eval_every", cfg.eval_every, 1), ("eval_batch_size", cfg.eval_batch_size, 1),
              ("data.m", d.m, 1), ("data.batch_size", d.batch_size, 1), ("data.num_workers", d.num_workers, 0),
              ("optim.step_size", o.step_size, 1), ("loss.warmup_epochs", lo.warmup_epochs, 0))
    if d.batches_per_epoch is not None:
        _at_least(("data.batches_per_epoch", d.batches_per_epoch, 1))
    if not cfg.eval_ks or min(cfg.eval_ks) < 1:
        raise ConfigError(f"eval_ks must be a non-empty list of integers >= 1, got {cfg.eval_ks}")
    if any(m < 0 for m in o.milestones):
        raise ConfigError(f"optim.milestones must be epochs >= 0, got {o.milestones}")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {cfg.seed}")
    for name, value in (("optim.lr", o.lr), ("optim.gamma", o.gamma), ("loss.lr", lo.lr)):
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    for name, value in (("optim.backbone_lr_scale", o.backbone_lr_scale), ("optim.weight_decay", o.weight_decay)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    if not 0.0 < d.test_classes < 1.0:
        raise ConfigError(f"data.test_classes must be in (0, 1), got {d.test_classes}")
    if not 0.0 <= d.val_classes < 1.0:
        raise ConfigError(f"data.val_classes must be in [0, 1), got {d.val_classes}")
    if not 0.0 < d.train_scale[0] <= d.train_scale[1] <= 1.0:
        raise ConfigError(f"data.train_scale must be [low, high] with 0 < low <= high <= 1, got {list(d.train_scale)}")
    if not 0.0 <= d.label_noise < 1.0:
        raise ConfigError(f"data.label_noise must be in [0, 1), got {d.label_noise}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.preprocess.channels == "L" and cfg.model.in_channels != 1:
        raise ConfigError("preprocess.channels L needs model.in_channels 1")


def _at_least(*checks: tuple[str, int, int]) -> None:
    for name, value, minimum in checks:
        if value < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value}")
