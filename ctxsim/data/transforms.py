"""Preprocessing contract (``Preprocess``), the train/eval transforms built from it, and the DataLoader factory.

``Preprocess`` is what a model card records under ``"preprocess"``; ``eval_transform(preprocess)`` is the exact
input pipeline the exported model expects (Resize shorter side -> CenterCrop -> ToTensor -> Normalize), so training,
evaluation, export parity and deployment all share it. Images are first converted to ``preprocess.channels``
("RGB": greyscale replicated to 3 channels; "L": colour converted to luminance). Nothing is inverted: Omniglot
stays black strokes on white, as stored.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ctxsim.errors import ConfigError
from ctxsim.schema import check

__all__ = ["CHANNELS", "INTERPOLATIONS", "ConvertMode", "Preprocess", "eval_transform", "make_loader",
           "train_transform"]

INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}
CHANNELS = {"RGB": 3, "L": 1}


@dataclass(frozen=True)
class Preprocess:
    """A model's input contract: crop size, resize size (shorter side), channel mean/std, channels, interpolation."""

    input_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: str = "RGB"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        for name in ("input_size", "resize_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ConfigError(f"preprocess {name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.resize_size < self.input_size:
            raise ConfigError(
                f"preprocess resize_size ({self.resize_size}) must be >= input_size ({self.input_size})"
            )
        if self.channels not in CHANNELS:
            raise ConfigError(f"preprocess channels must be 'RGB' or 'L', got {self.channels!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"preprocess interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        c = CHANNELS[self.channels]
        if len(self.mean) != c or len(self.std) != c:
            raise ConfigError(
                f"preprocess channels {self.channels!r} needs {c} mean and std values, got {len(self.mean)} "
                f"and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocess std values must be > 0, got {self.std}")

    @property
    def num_channels(self) -> int:
        """3 for "RGB", 1 for "L"."""
        return CHANNELS[self.channels]

    @property
    def interpolation_mode(self) -> InterpolationMode:
        """The torchvision InterpolationMode for ``interpolation``."""
        return INTERPOLATIONS[self.interpolation]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (mean/std as lists), the model card's ``"preprocess"`` entry."""
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        """Inverse of :meth:`to_dict`; unknown or missing keys and values of the wrong type are a ConfigError."""
        return check(d, cls, "preprocess")

    @classmethod
    def imagenet(cls, input_size: int = 224, resize_size: int = 256) -> Preprocess:
        """RGB with ImageNet mean/std (for ImageNet-pretrained backbones)."""
        return cls(input_size, resize_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "RGB", "bilinear")

    @classmethod
    def greyscale(cls, input_size: int = 28, resize_size: int = 28) -> Preprocess:
        """Single-channel "L" input normalised to [-1, 1] (mean 0.5, std 0.5), e.g. Omniglot or digits."""
        return cls(input_size, resize_size, (0.5,), (0.5,), "L", "bilinear")


class ConvertMode:
    """Convert a PIL image to ``mode`` ("RGB" or "L") if it is not already; picklable (for DataLoader workers)."""

    def __init__(self, mode: str) -> None:
        if mode not in CHANNELS:
            raise ConfigError(f"mode must be 'RGB' or 'L', got {mode!r}")
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


def _as_preprocess(p: Preprocess | Mapping[str, Any]) -> Preprocess:
    return p if isinstance(p, Preprocess) else Preprocess.from_dict(p)


def train_transform(
    preprocess: Preprocess | Mapping[str, Any],
    scale: tuple[float, float] = (0.16, 1.0),
    hflip: bool = True,
) -> T.Compose:
    """ConvertMode -> RandomResizedCrop(input_size, scale) -> RandomHorizontalFlip -> ToTensor -> Normalize."""
    p = _as_preprocess(preprocess)
    lo, hi = (float(s) for s in scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    steps: list[Callable] = [
        ConvertMode(p.channels),
        T.RandomResizedCrop(p.input_size, scale=(lo, hi), interpolation=p.interpolation_mode),
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(p.mean, p.std)]
    return T.Compose(steps)


def eval_transform(preprocess: Preprocess | Mapping[str, Any]) -> T.Compose:
    """ConvertMode -> Resize(resize_size, shorter side) -> CenterCrop(input_size) -> ToTensor -> Normalize."""
    p = _as_preprocess(preprocess)
    return T.Compose([
        ConvertMode(p.channels),
        T.Resize(p.resize_size, interpolation=p.interpolation_mode),
        T.CenterCrop(p.input_size),
        T.ToTensor(),
        T.Normalize(p.mean, p.std),
    ])


def make_loader(
    dataset: Dataset,
    batch_sampler: Sampler[list[int]] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int | None = None,
    collate_fn: Callable | None = None,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader: ``batch_sampler`` if given (then batch_size/shuffle/drop_last are ignored), else plain batches.

    ``pin_memory`` is on when ``device`` is CUDA (and CUDA is available); ``persistent_workers`` when
    ``num_workers > 0``. ``seed`` fixes the shuffle order.
    """
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    pin = torch.device(device).type == "cuda" and torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_workers=int(num_workers),
        pin_memory=pin,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
    )
    if num_workers > 0 and prefetch_factor is not None:
        kwargs["prefetch_factor"] = int(prefetch_factor)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    generator = torch.Generator().manual_seed(int(seed)) if (shuffle and seed is not None) else None
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=shuffle, drop_last=drop_last,
                      generator=generator, **kwargs)
