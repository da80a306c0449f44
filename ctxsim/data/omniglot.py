"""Omniglot read straight from the official zips (no extraction): class = alphabet/character, super-class = alphabet.

The zips hold ``images_background/<Alphabet>/<characterNN>/<file>.png`` (964 characters in 30 alphabets,
19,280 images) and ``images_evaluation/...`` (659 characters in 20 alphabets, 13,180 images); 20 drawings
per character, 105x105, stored as 1-bit PNGs and returned as "L" images with values 0/255.

Images are kept as stored: black strokes on a white background, no inversion. Recipes that want white-on-black
must invert in their own transform.

The ZipFile is opened lazily, once per process (the handle is dropped when pickled and re-opened when the
process id changes), so DataLoader workers, forked or spawned, each read through their own file handle.
"""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from PIL import Image

from ctxsim.errors import ConfigError, DataError
from ctxsim.data.datasets import ImageDataset, Record, open_image, scan_class_folders

SPLITS = {"background": "images_background", "evaluation": "images_evaluation"}


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
        records = []
        for alphabet, _ in scan_class_folders(self.root, (".png",)):
            for character, files in scan_class_folders(self.root / alphabet, (".png",)):
                records.extend(Record(str(p), f"{alphabet}/{character}", alphabet) for p in files)
        if not records:
            raise DataError(f"no '<Alphabet>/<character>/*.png' images under {self.root}")
        super().__init__(records, transform=transform, on_error=on_error)


def omniglot(
    root: str | os.PathLike,
    split: str = "background",
    *,
    transform: Callable | None = None,
    on_error: str = "raise",
) -> ImageDataset:
    """Omniglot's ``"background"`` (964 classes) or ``"evaluation"`` (659 classes) split from ``root``.

    ``root`` holds ``images_<split>.zip`` (read in place) or an extracted ``images_<split>/`` folder;
    ``root`` may also be the zip itself.
    """
    if split not in SPLITS:
        raise ConfigError(f"Omniglot split must be one of {sorted(SPLITS)}, got {split!r}")
    name = SPLITS[split]
    root = Path(root)
    if root.is_file() and root.suffix == ".zip":
        return OmniglotZip(root, name, transform=transform, on_error=on_error)
    if (root / f"{name}.zip").is_file():
        return OmniglotZip(root / f"{name}.zip", name, transform=transform, on_error=on_error)
    if (root / name).is_dir():
        return OmniglotFolder(root / name, transform=transform, on_error=on_error)
    raise DataError(f"neither {root / (name + '.zip')} nor {root / name}/ exists; download Omniglot there")


__all__ = ["OmniglotZip", "OmniglotFolder", "omniglot"]
