"""scikit-learn's bundled 8x8 digits (1,797 images, offline) as an ImageDataset for fast, download-free tests and demos.

Each 8x8 image (values 0..16) is scaled to 0..255 and upscaled to ``size`` x ``size`` (default 32) with
nearest-neighbour interpolation (each source pixel becomes a block), returned as a PIL "L" image: bright strokes
on black, as sklearn stores them. Splits are class-disjoint, as in metric learning: ``"train"`` = digits 0-4,
``"test"`` = digits 5-9, ``"all"`` = 0-9. Labels are contiguous per split (test labels 0..4 name the digits 5..9);
``class_names`` keep the digit ("5" ... "9").
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from ctxsim.data.datasets import ImageDataset, Record
from ctxsim.errors import ConfigError

__all__ = ["SPLIT_CLASSES", "DigitsDataset", "digits"]

SPLIT_CLASSES = {"train": range(5), "test": range(5, 10), "all": range(10)}


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


class DigitsDataset(ImageDataset):
    """The sklearn digits of one split; ``size`` is the output side in pixels (a multiple of 8 keeps blocks even)."""

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        *,
        transform: Callable | None = None,
        on_error: str = "raise",
    ) -> None:
        if split not in SPLIT_CLASSES:
            raise ConfigError(f"digits split must be one of {sorted(SPLIT_CLASSES)}, got {split!r}")
        if int(size) < 1:
            raise ConfigError(f"digits size must be positive, got {size}")
        self.split = split
        self.size = int(size)
        images, targets = _load_digits()
        keep = set(SPLIT_CLASSES[split])
        idx = [i for i in range(len(targets)) if int(targets[i]) in keep]
        self._images = images[idx]  # only this split's pixels travel with the dataset when pickled
        records = [Record(k, str(int(targets[i])), None, f"sklearn-digits/{i:04d}") for k, i in enumerate(idx)]
        super().__init__(records, transform=transform, on_error=on_error,
                         class_order=[str(c) for c in SPLIT_CLASSES[split]])

    def _load_source(self, source: Any) -> Image.Image:
        img = Image.fromarray(self._images[int(source)])  # uint8 2-D -> mode "L"
        if self.size != img.width:
            img = img.resize((self.size, self.size), Image.Resampling.NEAREST)
        return img


def digits(split: str = "train", size: int = 32, **kwargs: Any) -> DigitsDataset:
    """``DigitsDataset(split, size)``: ``"train"`` digits 0-4, ``"test"`` digits 5-9, ``"all"``."""
    return DigitsDataset(split, size, **kwargs)
