"""Galleries to index: a class-per-folder tree or a list file (``path [label]``); unreadable images are reported.

A gallery is a list of :class:`GalleryItem` (path, label or None):

- a folder whose sub-folders are classes (``root/<label>/**/<image>``, label = sub-folder name); image files
  directly under ``root`` are items without a label;
- a list file (any file that is not an image): one ``path [label]`` per line. A line with a comma is split on
  commas (so paths may hold spaces), otherwise on whitespace; relative paths are resolved against the list
  file's folder; blank lines and ``#`` comments are ignored;
- a Python sequence of paths, ``(path, label)`` pairs or :class:`GalleryItem` s.

Nothing is decoded while scanning. Images are decoded when they are embedded; one that cannot be read, or that
is over the decoding limits of :mod:`ctxsim.data.limits` (refused from its header), is skipped and reported as
``(path, reason)`` (see :func:`load_images`), never silently dropped.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ctxsim.data.datasets import IMG_EXTENSIONS, natural_key, scan_class_folders
from ctxsim.data.images import as_l_or_rgb, image_errors, open_image, read_list_file
from ctxsim.data.limits import check_image_size
from ctxsim.errors import DataError

__all__ = ["Gallery", "GalleryItem", "load_image", "load_images", "open_gallery"]


@dataclass(frozen=True)
class GalleryItem:
    """One image to index: where it is and its label (a class name), if known."""

    path: str
    label: str | None = None


@dataclass
class Gallery:
    """The items of a gallery in a deterministic order, and where they came from."""

    items: list[GalleryItem]
    source: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # filled while embedding

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[str]:
        return [it.path for it in self.items]

    @property
    def labels(self) -> list[str | None]:
        return [it.label for it in self.items]


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _from_folder(root: Path) -> list[GalleryItem]:
    items = [GalleryItem(str(p), None)
             for p in sorted((p for p in root.iterdir() if p.is_file() and _is_image_name(p.name)),
                             key=lambda p: natural_key(p.name))]
    for name, files in scan_class_folders(root, IMG_EXTENSIONS):
        items.extend(GalleryItem(str(p), name) for p in files)
    return items


def _from_list_file(path: Path) -> list[GalleryItem]:
    items = []
    for _, parts in read_list_file(path, "path [label]", (1, 2)):
        p = Path(parts[0]).expanduser()
        full = p if p.is_absolute() else path.parent / p
        items.append(GalleryItem(str(full), parts[1] if len(parts) == 2 else None))
    return items


def open_gallery(source: str | os.PathLike | Gallery | Sequence[Any]) -> Gallery:
    """Scan a gallery: a class-per-folder tree, a list file, or a sequence of paths / (path, label) pairs.

    Raises DataError when the folder or list file is missing or holds no images.
    """
    if isinstance(source, Gallery):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            items = _from_folder(path)
            if not items:
                raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {path} or its class sub-folders")
        elif path.is_file() and _is_image_name(path.name):
            items = [GalleryItem(str(path), None)]
        elif path.is_file():
            items = _from_list_file(path)
            if not items:
                raise DataError(f"list file {path} names no images")
        else:
            raise DataError(f"gallery not found: {path} (give a class-per-folder tree or a list file)")
        return Gallery(items, str(path))
    items = []
    for x in source:
        if isinstance(x, GalleryItem):
            items.append(x)
        elif isinstance(x, (str, os.PathLike)):
            items.append(GalleryItem(str(x), None))
        elif isinstance(x, (tuple, list)) and len(x) == 2:
            items.append(GalleryItem(str(x[0]), None if x[1] is None else str(x[1])))
        else:
            raise DataError(f"gallery entries must be paths or (path, label) pairs, got {x!r}")
    if not items:
        raise DataError("the gallery is empty")
    return Gallery(items, "<list>")


def load_image(source: Any) -> Image.Image:
    """Decode one image (a path, bytes, a file object, or a PIL image) as "L" or "RGB"; DataError if unreadable,
    ImageRefused (a DataError) if over the limits of ``ctxsim.data.limits`` (a PIL image: its aspect ratio only)."""
    if isinstance(source, Image.Image):
        check_image_size(*source.size, check_pixels=False)  # decoded already; its resize is still to come
        return as_l_or_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        import io

        source = io.BytesIO(bytes(source))
    with image_errors(str(source) if isinstance(source, (str, os.PathLike)) else "<upload>"):
        return open_image(source)


def load_images(sources: Iterable[Any]) -> tuple[list[Image.Image], list[int], list[tuple[str, str]]]:
    """Decode several images, skipping unreadable ones.

    Returns (images, positions of the decoded ones in ``sources``, [(path, reason)] of the skipped ones).
    """
    images, ok, bad = [], [], []
    for i, s in enumerate(sources):
        try:
            images.append(load_image(s))
            ok.append(i)
        except DataError as e:
            bad.append((str(s) if not isinstance(s, Image.Image) else f"<image {i}>", str(e)))
    return images, ok, bad
