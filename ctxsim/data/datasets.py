"""Image datasets with contiguous labels: the base class, folder and list-file readers, subsets, class-disjoint splits.

Readers produce :class:`Record` s (source, class, optional super-class, display path); :class:`ImageDataset` turns
them into ``paths``, ``labels`` (0..C-1, natural sort of the class names unless a reader orders them, so the same
on every machine), ``super_labels`` (or None), ``load_image(i)`` ("RGB" or "L") and ``__getitem__(i) ->
(transform(image), label)``. A missing, unreadable or corrupt image, or one over :mod:`ctxsim.data.limits`
(refused from its header), is a :class:`ctxsim.errors.DataError` naming its path. With ``on_error="skip"``,
``__getitem__`` takes the next readable item of the same class instead (labels, and so m-per-class batches,
unchanged), names it in a warning and in ``skipped`` (per process); ``load_image`` always raises.
"""
from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image

from ctxsim.data.images import image_errors, open_image, read_list_file
from ctxsim.errors import ConfigError, DataError

__all__ = ["IMG_EXTENSIONS", "ON_ERROR", "ImageDataset", "ImageFolderDataset", "ListFileDataset", "Record",
           "class_disjoint_split", "natural_key", "scan_class_folders", "subset", "super_class_disjoint_split"]

logger = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)
ON_ERROR = ("raise", "skip")


def natural_key(s: str) -> tuple:
    """Sort key that orders embedded numbers numerically ("char2" < "char10"); ties broken by the raw string."""
    parts = re.split(r"(\d+)", s)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), s


@dataclass(frozen=True)
class Record:
    """One item as a reader sees it: where to read it, its class name and optional super-class name."""

    source: Any
    class_name: str
    super_name: str | None = None
    path: str | None = None  # display path; defaults to str(source)


def _check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def _order(names: Iterable[str], explicit: Sequence[str] | None, what: str) -> list[str]:
    present = set(names)
    if explicit is None:
        return sorted(present, key=natural_key)
    order = [str(n) for n in explicit]
    if len(set(order)) != len(order):
        raise ConfigError(f"{what} order has duplicate names")
    missing = present - set(order)
    if missing:
        raise ConfigError(f"{what} names {sorted(missing)[:5]} are not in the given {what} order")
    return order


class ImageDataset(torch.utils.data.Dataset):
    """A labelled image dataset built from :class:`Record` s; see the module docstring for the contract.

    Subclasses override :meth:`_load_source` when a source is not a file path (zip member, array index).
    ``class_order`` / ``super_order`` fix the label order (default: natural sort of the names); an order may
    name classes with no items (then those labels have no images; used to share one label space across splits).
    """

    def __init__(
        self,
        records: Iterable[Record],
        *,
        transform: Callable | None = None,
        on_error: str = "raise",
        class_order: Sequence[str] | None = None,
        super_order: Sequence[str] | None = None,
    ) -> None:
        self.transform = transform
        self.on_error = _check_on_error(on_error)
        self.skipped: list[str] = []
        self._bad: set[int] = set()
        self._set_records(records, class_order, super_order)

    # ------------------------------------------------------------------ records and labels
    def _set_records(
        self,
        records: Iterable[Record],
        class_order: Sequence[str] | None = None,
        super_order: Sequence[str] | None = None,
    ) -> None:
        records = list(records)
        self.class_names: list[str] = _order((r.class_name for r in records), class_order, "class")
        index = {n: i for i, n in enumerate(self.class_names)}
        self._records = records
        self._sources = [r.source for r in records]
        self.paths: list[str] = [r.path if r.path is not None else str(r.source) for r in records]
        self.labels: list[int] = [index[r.class_name] for r in records]
        supers = [r.super_name for r in records if r.super_name is not None]
        if records and len(supers) == len(records):
            self.super_class_names: list[str] | None = _order(supers, super_order, "super-class")
            sindex = {n: i for i, n in enumerate(self.super_class_names)}
            self.super_labels: list[int] | None = [sindex[s] for s in supers]
        elif supers:
            raise DataError("some items have a super-class and some do not; give every item one or none")
        else:
            self.super_class_names = None
            self.super_labels = None
        self._by_class: dict[int, list[int]] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes C (labels are 0..C-1)."""
        return len(self.class_names)

    @property
    def num_super_classes(self) -> int | None:
        """Number of super-classes, or None when the dataset has none."""
        return None if self.super_class_names is None else len(self.super_class_names)

    @property
    def records(self) -> list[Record]:
        """The records this dataset was built from (read-only by convention)."""
        return self._records

    def __len__(self) -> int:
        return len(self._sources)

    def __repr__(self) -> str:
        sup = "" if self.super_class_names is None else f", super_classes={self.num_super_classes}"
        return f"{type(self).__name__}(items={len(self)}, classes={self.num_classes}{sup})"

    def indices_of_class(self, label: int) -> list[int]:
        """Indices of the items with ``label``, in dataset order."""
        if self._by_class is None:
            by: dict[int, list[int]] = {}
            for i, y in enumerate(self.labels):
                by.setdefault(y, []).append(i)
            self._by_class = by
        return self._by_class.get(label, [])

    def with_records(
        self,
        records: Iterable[Record],
        class_order: Sequence[str] | None = None,
        super_order: Sequence[str] | None = None,
    ) -> ImageDataset:
        """A copy of this dataset (same reader, transform and error policy) holding other records."""
        new = copy.copy(self)
        new.skipped = []
        new._bad = set()
        new._set_records(records, class_order, super_order)
        return new

    def with_transform(self, transform: Callable | None) -> ImageDataset:
        """A shallow copy of this dataset with another transform (the items are shared)."""
        new = copy.copy(self)
        new.transform = transform
        new.skipped = []
        new._bad = set()
        return new

    # ------------------------------------------------------------------ loading
    def _load_source(self, source: Any) -> Image.Image:
        """Read one source into a PIL image; the default treats it as a file path."""
        return open_image(source)

    def load_image(self, i: int) -> Image.Image:
        """The i-th image as a PIL image ("RGB" or "L", as stored); DataError naming the path if unreadable."""
        with image_errors(self.paths[i], hint="check the dataset root or the file, or use on_error='skip'"):
            return self._load_source(self._sources[i])

    def _replacement(self, i: int, err: DataError) -> tuple[Image.Image, int]:
        self._mark_bad(i, err)
        same = self.indices_of_class(self.labels[i])
        pos = same.index(i)
        for j in same[pos + 1:] + same[:pos]:
            if j in self._bad:
                continue
            try:
                img = self.load_image(j)
            except DataError as e2:
                self._mark_bad(j, e2)
                continue
            logger.debug("using %s in place of unreadable %s (same class)", self.paths[j], self.paths[i])
            return img, j
        raise DataError(
            f"every image of class {self.class_names[self.labels[i]]!r} is unreadable "
            f"(first: {self.paths[i]}); fix the files or remove the class"
        )

    def _mark_bad(self, i: int, err: Exception) -> None:
        if i not in self._bad:
            self._bad.add(i)
            self.skipped.append(self.paths[i])
            logger.warning("skipping unreadable image %s: %s", self.paths[i], err)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} items")
        if self.on_error == "skip" and i in self._bad:
            img, _ = self._replacement(i, DataError(self.paths[i]))
        else:
            try:
                img = self.load_image(i)
            except DataError as e:
                if self.on_error == "raise":
                    raise
                img, _ = self._replacement(i, e)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[i]


# ---------------------------------------------------------------------- readers
def _is_image(name: str, extensions: Sequence[str]) -> bool:
    return not name.startswith(".") and name.lower().endswith(tuple(extensions))


def scan_class_folders(
    root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS
) -> list[tuple[str, list[Path]]]:
    """(class folder name, sorted image paths under it, recursively) for each sub-folder of root, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    out = []
    for d in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                    key=lambda p: natural_key(p.name)):
        files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
            dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
            files.extend(Path(dirpath) / f for f in filenames if _is_image(f, extensions))
        files.sort(key=lambda p: natural_key(str(p.relative_to(d))))
        if files:
            out.append((d.name, files))
    return out


class ImageFolderDataset(ImageDataset):
    """Class-per-folder tree: ``root/<class>/**/<image>``; class name = folder name; sorted deterministically.

    Files with other extensions and hidden files/folders are ignored; folders with no images are not classes.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        transform: Callable | None = None,
        on_error: str = "raise",
        extensions: Sequence[str] = IMG_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        classes = scan_class_folders(self.root, extensions)
        if not classes:
            raise DataError(f"no class folders with images ({', '.join(extensions)}) under {self.root}")
        records = [Record(str(p), name) for name, files in classes for p in files]
        super().__init__(records, transform=transform, on_error=on_error)


class ListFileDataset(ImageDataset):
    """Items from a list file: one ``path label [super_label]`` per line, comma- or whitespace-separated.

    A line with a comma is split on commas (so paths may contain spaces), otherwise on whitespace.
    Relative paths are resolved against ``root`` (default: the list file's folder). Blank lines and '#' comments
    (a line starting with '#', or text after a whitespace-preceded '#') are ignored. Labels are names: "3"
    and "cat" both work; they are ordered naturally (numbers numerically) to give contiguous labels.
    Either every line has a super label or none does.
    """

    def __init__(
        self,
        list_file: str | os.PathLike,
        root: str | os.PathLike | None = None,
        *,
        transform: Callable | None = None,
        on_error: str = "raise",
    ) -> None:
        self.list_file = Path(list_file)
        self.root = Path(root) if root is not None else self.list_file.parent
        records = []
        for _, parts in read_list_file(self.list_file, "path label [super_label]", (2, 3)):
            p = Path(parts[0])
            full = p if p.is_absolute() else self.root / p
            records.append(Record(str(full), parts[1], parts[2] if len(parts) == 3 else None))
        if not records:
            raise DataError(f"list file {self.list_file} has no items")
        super().__init__(records, transform=transform, on_error=on_error)


# ---------------------------------------------------------------------- subsets and splits
def subset(dataset: ImageDataset, indices: Iterable[int]) -> ImageDataset:
    """The items at ``indices`` (in that order) as a dataset of the same kind, labels re-mapped to 0..C'-1.

    The kept classes keep their relative order (and names); likewise the super-classes.
    """
    idx = [int(i) for i in indices]
    n = len(dataset)
    for i in idx:
        if not -n <= i < n:
            raise ConfigError(f"subset index {i} out of range for a dataset of {n} items")
    recs = dataset.records
    chosen = [recs[i] for i in idx]
    present = {r.class_name for r in chosen}
    order = [c for c in dataset.class_names if c in present]
    sorder = None
    if dataset.super_class_names is not None:
        spresent = {r.super_name for r in chosen}
        sorder = [s for s in dataset.super_class_names if s in spresent]
    return dataset.with_records(chosen, order, sorder)


def _n_holdout(n_units: int, holdout_fraction: float | None, n_holdout: int | None, what: str) -> int:
    if (holdout_fraction is None) == (n_holdout is None):
        raise ConfigError("give exactly one of holdout_fraction and n_holdout_classes")
    if n_units < 2:
        raise ConfigError(f"a {what}-disjoint split needs at least 2 {what}es, the dataset has {n_units}")
    if holdout_fraction is not None:
        if not 0.0 < float(holdout_fraction) < 1.0:
            raise ConfigError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        k = round(float(holdout_fraction) * n_units)
        return min(max(k, 1), n_units - 1)
    k = int(n_holdout)  # type: ignore[arg-type]
    if not 1 <= k <= n_units - 1:
        raise ConfigError(f"n_holdout_classes must be in [1, {n_units - 1}] for {n_units} {what}es, got {k}")
    return k


def class_disjoint_split(
    dataset: ImageDataset,
    holdout_fraction: float | None = None,
    n_holdout_classes: int | None = None,
    seed: int = 0,
    by: str = "class",
) -> tuple[ImageDataset, ImageDataset]:
    """Split into (train, holdout) that share no class; the same seed always gives the same split.

    ``by="class"`` holds out whole classes; ``by="super"`` holds out whole super-classes (e.g. Omniglot
    alphabets), and then ``holdout_fraction`` / ``n_holdout_classes`` count super-classes. The units to hold out
    are the first k of a seeded permutation of the labels; each side keeps dataset order and gets contiguous labels.
    """
    if by == "class":
        units = np.asarray(dataset.labels)
        n_units = dataset.num_classes
    elif by == "super":
        if dataset.super_labels is None:
            raise ConfigError("by='super' needs a dataset with super_labels; use by='class'")
        units = np.asarray(dataset.super_labels)
        n_units = dataset.num_super_classes or 0
    else:
        raise ConfigError(f"by must be 'class' or 'super', got {by!r}")
    k = _n_holdout(n_units, holdout_fraction, n_holdout_classes, "class" if by == "class" else "super-class")
    held = np.random.default_rng(seed).permutation(n_units)[:k]
    mask = np.isin(units, held)
    return subset(dataset, np.flatnonzero(~mask)), subset(dataset, np.flatnonzero(mask))


def super_class_disjoint_split(
    dataset: ImageDataset,
    holdout_fraction: float | None = None,
    n_holdout_super_classes: int | None = None,
    seed: int = 0,
) -> tuple[ImageDataset, ImageDataset]:
    """``class_disjoint_split(..., by="super")``: hold out whole super-classes (Omniglot alphabets for validation)."""
    return class_disjoint_split(dataset, holdout_fraction, n_holdout_super_classes, seed=seed, by="super")
