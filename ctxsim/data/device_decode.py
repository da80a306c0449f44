"""Decode and augment training JPEGs on the training device (``data.decode: device``).

With the default ``data.decode: loader`` the DataLoader decodes every image with Pillow and applies the train
transform on the CPU, which can starve a fast GPU. With ``device`` the loader only reads each file's bytes;
:class:`DeviceAugment` decodes the whole batch at once with ``torchvision.io.decode_jpeg(..., device=...)``
(nvJPEG on CUDA, libjpeg on the CPU) and applies the same train transform there: RandomResizedCrop with the
recipe's scale range, optional horizontal flip, scaling to [0, 1] and the preprocessing contract's mean/std.
Evaluation keeps the Pillow pipeline (``eval_transform``), which is the exported model's contract.

Requirements, checked when the data is built: every training image is a JPEG file on disk, and corrupt images
raise (``on_error: skip`` needs per-image decoding in the loader). The CUDA path has not run on this project's
machines (no GPU was lent); the CPU path is tested against the Pillow pipeline.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.io import ImageReadMode
from torchvision.transforms import functional as F

from ctxsim.data.datasets import ImageDataset
from ctxsim.data.transforms import Preprocess
from ctxsim.errors import ConfigError, DataError

JPEG_SUFFIXES = (".jpg", ".jpeg")
TENSOR_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def _read_file(path: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


class EncodedImages(Dataset):
    """(the file's bytes as a 1-D uint8 tensor, label) for each item of an ImageDataset of JPEG files."""

    def __init__(self, dataset: ImageDataset) -> None:
        if type(dataset)._load_source is not ImageDataset._load_source:
            raise ConfigError(f"data.decode=device needs image files on disk; {type(dataset).__name__} reads its "
                              "images from elsewhere (a zip or an array): use data.decode=loader")
        if dataset.on_error != "raise":
            raise ConfigError("data.decode=device decodes whole batches and cannot skip a corrupt image: use "
                              "data.on_error=raise, or data.decode=loader")
        sources = [str(s) for s in dataset._sources]
        other = next((s for s in sources if not s.lower().endswith(JPEG_SUFFIXES)), None)
        if other is not None:
            raise ConfigError(f"data.decode=device decodes JPEG only; {other} is not a .jpg/.jpeg file: use "
                              "data.decode=loader")
        self.sources, self.labels = sources, list(dataset.labels)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            return _read_file(self.sources[i]), self.labels[i]
        except OSError as e:
            raise DataError(f"cannot read image {self.sources[i]}: {e}") from e


def collate_encoded(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A batch of encoded images stays a list (the images differ in size until decoded)."""
    return [b for b, _ in batch], torch.tensor([y for _, y in batch], dtype=torch.long)


class DeviceAugment:
    """Decode a list of JPEG byte tensors on ``device`` and apply the train transform there; returns (B, C, S, S)
    float32 on ``device``. Crop and flip draws come from torch's global CPU generator, like the loader pipeline."""

    def __init__(self, preprocess: Preprocess, scale: tuple[float, float], hflip: bool,
                 device: str | torch.device) -> None:
        if preprocess.interpolation not in TENSOR_INTERPOLATIONS:
            raise ConfigError(f"data.decode=device resizes tensors: preprocess.interpolation must be one of "
                              f"{', '.join(TENSOR_INTERPOLATIONS)}, got {preprocess.interpolation!r}")
        self.p, self.scale, self.hflip = preprocess, tuple(float(s) for s in scale), bool(hflip)
        self.device = torch.device(device)
        self.mode = ImageReadMode.RGB if preprocess.channels == "RGB" else ImageReadMode.GRAY
        c = preprocess.num_channels
        self.mean = torch.tensor(preprocess.mean, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(preprocess.std, device=self.device).view(1, c, 1, 1)
        self.ratio = (3 / 4, 4 / 3)  # RandomResizedCrop's default, as in train_transform

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import decode_jpeg

        with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec; the API still works
            warnings.simplefilter("ignore", UserWarning)
            try:
                return decode_jpeg(encoded, mode=self.mode, device=self.device)
            except RuntimeError as e:
                raise DataError(f"cannot decode a JPEG of this batch on {self.device}: {e}") from e

    def __call__(self, encoded: list[torch.Tensor]) -> torch.Tensor:
        s = self.p.input_size
        out = torch.empty(len(encoded), self.p.num_channels, s, s, device=self.device)
        for i, img in enumerate(self.decode(encoded)):
            top, left, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
            crop = F.resized_crop(img, top, left, h, w, [s, s], interpolation=self.p.interpolation_mode,
                                  antialias=True)
            if self.hflip and torch.rand(1).item() < 0.5:
                crop = crop.flip(-1)
            out[i] = crop
        return (out / 255.0 - self.mean) / self.std
