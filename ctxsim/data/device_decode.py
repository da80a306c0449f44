"""Decode JPEGs on the device: training batches (``data.decode: device``) and gallery batches (``--device-decode``).

The loader only reads each file's bytes; :class:`DeviceAugment` decodes the whole batch at once (torchvision's
``decode_jpeg`` or TorchCodec's, see :func:`jpeg_decoder`: nvJPEG on CUDA, libjpeg-turbo on the CPU) and applies
the train transform there (RandomResizedCrop, flip, mean/std). :class:`DeviceEvalTransform` is the eval
transform's tensor twin for large galleries on a GPU, close to but not bit-identical with Pillow's resampling
(evaluation itself keeps Pillow: it is the exported model's contract). Every training image must be a JPEG file,
and corrupt images raise. The CUDA path has not run on this project's machines; the CPU path is tested against
the Pillow pipeline. Throughput: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as F

from ctxsim.data.datasets import ImageDataset
from ctxsim.data.limits import check_image_size
from ctxsim.data.transforms import Preprocess
from ctxsim.errors import ConfigError, DataError, MissingDependency

__all__ = ["JPEG_SUFFIXES", "TENSOR_INTERPOLATIONS", "DeviceAugment", "DeviceEvalTransform", "EncodedImages",
           "collate_encoded", "jpeg_decoder"]

JPEG_SUFFIXES = (".jpg", ".jpeg")
TENSOR_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def jpeg_decoder(prefer: str = "torchvision") -> tuple[str, Callable[..., list[torch.Tensor]]]:
    """(name, decode) where ``decode(list_of_byte_tensors, channels, device)`` returns CHW uint8 tensors laid out
    as Pillow decodes them, i.e. ignoring EXIF orientation, as the evaluation and export pipelines do.

    torchvision's ``decode_jpeg`` first (deprecated since torchvision 0.29, still working), TorchCodec's where
    torchvision's is gone or ``prefer="torchcodec"``; TorchCodec applies EXIF orientation, which is undone here.
    """
    if prefer not in ("torchcodec", "torchvision"):
        raise ConfigError(f"JPEG decoder must be torchcodec or torchvision, got {prefer!r}")
    vision: Callable[..., Any] | None = None
    codec: Callable[..., Any] | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with contextlib.suppress(ImportError):
            from torchvision.io import ImageReadMode, decode_jpeg

            vision = decode_jpeg
    with contextlib.suppress(ImportError, OSError, RuntimeError):  # missing, or built for another torch
        from torchcodec.decoders import decode_jpeg as torchcodec_decode_jpeg

        codec = torchcodec_decode_jpeg
    if codec is not None and (prefer == "torchcodec" or vision is None):
        def decode_codec(encoded, channels, device):
            images = codec(list(encoded), mode="RGB" if channels == "RGB" else "GRAY", device=device)
            return [_undo_orientation(img, _exif_orientation(b)) for img, b in zip(images, encoded)]
        return "torchcodec", decode_codec
    if vision is None:
        raise MissingDependency("decoding JPEGs on the device needs torchvision's decode_jpeg or TorchCodec: "
                                "pip install 'ctxsim[decode]'")

    def decode_vision(encoded, channels, device):
        mode = ImageReadMode.RGB if channels == "RGB" else ImageReadMode.GRAY
        with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec; its API still works
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            return vision(list(encoded), mode=mode, device=device)
    return "torchvision", decode_vision


def _exif_orientation(encoded: torch.Tensor) -> int:
    """The EXIF orientation tag (1-8) of a JPEG, read from its header; 1 when absent or unreadable."""
    try:
        with Image.open(io.BytesIO(encoded.numpy().tobytes())) as im:
            value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - no usable header: the decoder's error (if any) says more
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _undo_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Invert the EXIF transpose a decoder applied, giving the stored pixel layout (what Pillow returns)."""
    h, w = -2, -1
    if orientation == 2:
        return img.flip(w)
    if orientation == 3:
        return img.flip(h).flip(w)
    if orientation == 4:
        return img.flip(h)
    if orientation == 5:
        return img.transpose(h, w)
    if orientation == 6:  # displayed turned 90 degrees clockwise: turn it back
        return torch.rot90(img, 1, dims=(h, w))
    if orientation == 7:
        return img.transpose(h, w).flip(h).flip(w)
    if orientation == 8:
        return torch.rot90(img, -1, dims=(h, w))
    return img


def _check_header(encoded: torch.Tensor) -> None:
    """``ctxsim.data.limits.check_image_size`` on a JPEG's header (ImageRefused/ImageTooLarge); a header Pillow
    cannot parse is left to the decoder, whose error says more."""
    try:
        with Image.open(io.BytesIO(encoded.numpy().tobytes())) as im:
            size = im.size
    except Image.DecompressionBombError as e:
        raise DataError(f"image too large (decompression-bomb limit): {e}") from None
    except Exception:  # noqa: BLE001 - see the docstring
        return
    check_image_size(*size)


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
        sources = [str(r.source) for r in dataset.records]
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


class _DeviceTransform:
    """Shared by the train and eval transforms on the device: batch decoding, output buffer, normalisation.
    ``decoder``: "torchvision" (the default; TorchCodec where torchvision's decoder is gone) or "torchcodec"."""

    def __init__(self, preprocess: Preprocess, device: str | torch.device, decoder: str = "torchvision") -> None:
        if preprocess.interpolation not in TENSOR_INTERPOLATIONS:
            raise ConfigError(f"decoding on the device resizes tensors: preprocess.interpolation must be one of "
                              f"{', '.join(TENSOR_INTERPOLATIONS)}, got {preprocess.interpolation!r}")
        self.p, self.device = preprocess, torch.device(device)
        self.decoder, self._decode = jpeg_decoder(decoder)
        c = preprocess.num_channels
        self.mean = torch.tensor(preprocess.mean, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(preprocess.std, device=self.device).view(1, c, 1, 1)

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        for b in encoded:  # the decoding limits, from each header, before anything is decoded on the device
            _check_header(b)
        try:
            return self._decode(encoded, self.p.channels, self.device)
        except (RuntimeError, ValueError) as e:
            raise DataError(f"cannot decode a JPEG of this batch on {self.device} ({self.decoder}): {e}") from e

    def __call__(self, encoded: list[torch.Tensor]) -> torch.Tensor:
        s = self.p.input_size
        out = torch.empty(len(encoded), self.p.num_channels, s, s, device=self.device)
        for i, img in enumerate(self.decode(encoded)):
            out[i] = self.crop(img)
        return (out / 255.0 - self.mean) / self.std

    def crop(self, img: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DeviceAugment(_DeviceTransform):
    """Decode a list of JPEG byte tensors on ``device`` and apply the train transform there; returns (B, C, S, S)
    float32 on ``device``. Crop and flip draws come from torch's global CPU generator, like the loader pipeline."""

    def __init__(self, preprocess: Preprocess, scale: tuple[float, float], hflip: bool,
                 device: str | torch.device, decoder: str = "torchvision") -> None:
        super().__init__(preprocess, device, decoder)
        self.scale, self.hflip = tuple(float(s) for s in scale), bool(hflip)
        self.ratio = (3 / 4, 4 / 3)  # RandomResizedCrop's default, as in train_transform

    def crop(self, img: torch.Tensor) -> torch.Tensor:
        s = self.p.input_size
        top, left, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        out = F.resized_crop(img, top, left, h, w, [s, s], interpolation=self.p.interpolation_mode, antialias=True)
        return out.flip(-1) if self.hflip and torch.rand(1).item() < 0.5 else out


class DeviceEvalTransform(_DeviceTransform):
    """``eval_transform`` on the device: decode a list of JPEG byte tensors, resize the shorter side to
    ``resize_size``, centre-crop ``input_size``, scale to [0, 1] and normalise; returns (B, C, S, S) float32."""

    def crop(self, img: torch.Tensor) -> torch.Tensor:
        img = F.resize(img, self.p.resize_size, interpolation=self.p.interpolation_mode, antialias=True)
        return F.center_crop(img, [self.p.input_size] * 2)
