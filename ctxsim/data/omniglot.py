"""Omniglot read straight from the official zips (no extraction): class = alphabet/character, super-class = alphabet.

``images_background`` (964 characters, 30 alphabets) and ``images_evaluation`` (659, 20 alphabets), 20 drawings a
character, 105x105 1-bit PNGs returned as "L" images, black strokes on white as stored (a recipe that wants
white-on-black inverts in its transform). The zip is opened lazily once per process, so DataLoader workers each
read through their own handle. ``omniglot-mini``, a real sample shipped in ctxsim/data/omniglot_mini/ (its
README: what was kept, licence, provenance), needs no path: ``omniglot("omniglot-mini", "evaluation")``,
``open_dataset("omniglot-mini")`` or ``--data omniglot-mini``; a folder or file of that name, where one exists, wins.
"""
from __future__ import annotations

import functools
import io
import os
import zipfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from ctxsim.data.datasets import ImageDataset, Record, scan_class_folders
from ctxsim.data.images import open_image
from ctxsim.errors import ConfigError, DataError

SPLITS = {"background": "images_background", "evaluation": "images_evaluation"}
MINI = "omniglot-mini"  # the shipped sample's dataset name (also accepted as a root: --data omniglot-mini)
_MINI_NAMES = (MINI, "omniglot_mini")


class OmniglotZip(ImageDataset):
    """Omniglot from one official zip. ``split_name`` is the top folder inside the zip (default: any).

    Class names are ``"<Alphabet>/<characterNN>"``; super-class names are the alphabets. Display paths are
    ``<zip_path>/<member>``.
    """

    def __init__(
        self,
        zip_path: str | os.PathLike,
        split_name: str | None = None,
        *,
        transform: Callable | None = None,
        on_error: str = "raise",
    ) -> None:
        self.zip_path = Path(zip_path)
        self.split_name = split_name
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        if not self.zip_path.is_file():
            raise DataError(f"Omniglot zip not found: {self.zip_path}")
        try:
            with zipfile.ZipFile(self.zip_path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"cannot open Omniglot zip {self.zip_path}: {e}; re-download it") from e
        records = []
        for member in names:
            parts = PurePosixPath(member).parts
            if len(parts) != 4 or not parts[3].lower().endswith(".png"):
                continue
            top, alphabet, character, _ = parts
            if split_name is not None and top != split_name:
                continue
            records.append(Record(member, f"{alphabet}/{character}", alphabet, f"{self.zip_path}/{member}"))
        if not records:
            where = f" under '{split_name}/'" if split_name else ""
            raise DataError(
                f"no '<split>/<Alphabet>/<character>/<file>.png' images{where} in {self.zip_path}; "
                "is this an official Omniglot zip?"
            )
        records.sort(key=lambda r: r.source)
        super().__init__(records, transform=transform, on_error=on_error)

    def _zipfile(self) -> zipfile.ZipFile:
        pid = os.getpid()
        if self._zip is None or self._zip_pid != pid:
            # A handle inherited through fork shares its file offset with the parent: never reuse it.
            self._zip = zipfile.ZipFile(self.zip_path)
            self._zip_pid = pid
        return self._zip

    def _load_source(self, source: Any) -> Image.Image:
        with self._zipfile().open(source) as f:
            data = f.read()
        return open_image(io.BytesIO(data))

    def close(self) -> None:
        """Close this process's zip handle (it re-opens on the next read)."""
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip = None
        self._zip_pid = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"] = None
        state["_zip_pid"] = None
        return state


class OmniglotFolder(ImageDataset):
    """Omniglot from an extracted ``images_<split>/<Alphabet>/<character>/*.png`` tree (same names as the zip)."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        transform: Callable | None = None,
        on_error: str = "raise",
    ) -> None:
        self.root = Path(root)
        records: list[Record] = []
        for alphabet, _ in scan_class_folders(self.root, (".png",)):
            for character, files in scan_class_folders(self.root / alphabet, (".png",)):
                records.extend(Record(str(p), f"{alphabet}/{character}", alphabet) for p in files)
        if not records:
            raise DataError(f"no '<Alphabet>/<character>/*.png' images under {self.root}")
        super().__init__(records, transform=transform, on_error=on_error)


def mini_path() -> Path:
    """The shipped sample's file (ctxsim/data/omniglot_mini/omniglot_mini.npz)."""
    return Path(str(resources.files("ctxsim.data") / "omniglot_mini" / "omniglot_mini.npz"))


def is_mini(root: str | os.PathLike | None) -> bool:
    """True when ``root`` names the shipped sample (``omniglot-mini``) rather than an existing path."""
    return root is not None and str(root) in _MINI_NAMES and not Path(root).exists()


@functools.lru_cache(maxsize=4)
def _read_arrays(path: str) -> tuple[np.ndarray, tuple[str, ...]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            images, members = z["images"], z["members"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read the Omniglot sample {path} ({e}); reinstall ctxsim or regenerate it with "
                        "scripts/make_omniglot_mini.py") from e
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) != len(members):
        raise DataError(f"{path} is not an Omniglot sample (images (N, H, W) uint8 and N member names)")
    images.setflags(write=False)
    return images, tuple(m.decode("ascii") for m in members)


class OmniglotArrays(ImageDataset):
    """Omniglot drawings held in memory as uint8 arrays (the shipped ``omniglot-mini`` sample, or an ``.npz`` made
    by scripts/make_omniglot_mini.py). Same class, super-class and split names as :class:`OmniglotZip`; display
    paths are ``omniglot-mini/<member>`` (the member the drawing was reduced from). Images are "L", black on white.
    """

    def __init__(
        self,
        npz_path: str | os.PathLike | None = None,
        split_name: str | None = None,
        *,
        transform: Callable | None = None,
        on_error: str = "raise",
    ) -> None:
        self.npz_path = Path(npz_path) if npz_path is not None else mini_path()
        self.split_name = split_name
        if not self.npz_path.is_file():
            raise DataError(f"Omniglot sample not found: {self.npz_path}; reinstall ctxsim")
        images, members = _read_arrays(str(self.npz_path))
        prefix = MINI if npz_path is None else str(self.npz_path)
        keep: list[int] = []
        records: list[Record] = []
        for i, member in enumerate(members):
            top, alphabet, character, _ = PurePosixPath(member).parts
            if split_name is not None and top != split_name:
                continue
            records.append(Record(len(keep), f"{alphabet}/{character}", alphabet, f"{prefix}/{member}"))
            keep.append(i)
        if not records:
            raise DataError(f"no '{split_name}/' drawings in {self.npz_path}")
        self._images = images[keep]  # only this split's pixels travel with the dataset when pickled
        super().__init__(records, transform=transform, on_error=on_error)

    def _load_source(self, source: Any) -> Image.Image:
        return Image.fromarray(self._images[int(source)])  # uint8 2-D -> mode "L"


def omniglot_mini(split: str = "background", **kwargs: Any) -> OmniglotArrays:
    """The shipped sample's ``"background"`` (train) or ``"evaluation"`` (held-out alphabets) split."""
    if split not in SPLITS:
        raise ConfigError(f"Omniglot split must be one of {sorted(SPLITS)}, got {split!r}")
    return OmniglotArrays(None, SPLITS[split], **kwargs)


def omniglot(
    root: str | os.PathLike,
    split: str = "background",
    *,
    transform: Callable | None = None,
    on_error: str = "raise",
) -> ImageDataset:
    """Omniglot's ``"background"`` (964 classes) or ``"evaluation"`` (659 classes) split from ``root``.

    ``root`` holds ``images_<split>.zip`` (read in place) or an extracted ``images_<split>/`` folder;
    ``root`` may also be the zip itself, a sample ``.npz``, or ``"omniglot-mini"`` (the shipped sample).
    """
    if split not in SPLITS:
        raise ConfigError(f"Omniglot split must be one of {sorted(SPLITS)}, got {split!r}")
    name = SPLITS[split]
    if is_mini(root):
        return OmniglotArrays(None, name, transform=transform, on_error=on_error)
    root = Path(root)
    if root.is_file() and root.suffix == ".npz":
        return OmniglotArrays(root, name, transform=transform, on_error=on_error)
    if root.is_file() and root.suffix == ".zip":
        return OmniglotZip(root, name, transform=transform, on_error=on_error)
    if (root / f"{name}.zip").is_file():
        return OmniglotZip(root / f"{name}.zip", name, transform=transform, on_error=on_error)
    if (root / name).is_dir():
        return OmniglotFolder(root / name, transform=transform, on_error=on_error)
    raise DataError(f"neither {root / (name + '.zip')} nor {root / name}/ exists; download Omniglot there, "
                    f"or use the shipped sample: --data {MINI}")


__all__ = ["MINI", "OmniglotArrays", "OmniglotFolder", "OmniglotZip", "mini_path", "omniglot", "omniglot_mini"]
