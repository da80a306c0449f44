"""Readers for the paper's benchmark layouts (CUB, Cars196, SOP, In-Shop, iNaturalist 2021) and ``open_dataset``.

Each reader returns class-disjoint ImageDatasets, ``(train, test)`` or ``(train, query, gallery)``, with the
standard metric-learning splits: CUB-200-2011 classes 1-100 / 101-200; Cars196 1-98 / 99-196 (from a list file,
the authors' ``cars196_*.txt``, ``cars_annos.mat`` or a class-per-folder tree, first match wins); SOP
``Ebay_train.txt`` / ``Ebay_test.txt`` with super-labels; In-Shop ``list_eval_partition.txt``, query and gallery
sharing one label space; iNaturalist 2021 ``train_mini`` split 50/50 per super-category with a seed (the
authors' ``iNaturalist_train.txt`` / ``_test.txt`` when present). Class names are the dataset's own ids or folder
names, ordered by the dataset's class numbers. The layouts each recipe expects: docs/REPRODUCING.md.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctxsim.data.datasets import (
    ImageDataset,
    ImageFolderDataset,
    ListFileDataset,
    Record,
    natural_key,
    scan_class_folders,
)
from ctxsim.data.images import split_line, strip_comment
from ctxsim.errors import ConfigError, DataError

__all__ = ["EBAY_HEADER", "KNOWN_DATASETS", "cars196", "cub200", "inat2021", "inat_supercategory", "inshop",
           "open_dataset", "read_ebay_list", "sop"]

logger = logging.getLogger(__name__)

EBAY_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def _read_lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [(n, s) for n, raw in enumerate(f, 1) if (s := strip_comment(raw))]


def _int_field(value: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{where}: expected an integer, got {value!r}") from None


def _split_by_class_number(
    records: list[Record],
    numbers: dict[str, int],
    boundary: int,
    keep_super: bool = True,
    **kwargs: Any,
) -> tuple[ImageDataset, ImageDataset]:
    """(classes numbered <= boundary, the rest), each ordered by class number."""
    if not keep_super:
        records = [Record(r.source, r.class_name, None, r.path) for r in records]
    train = [r for r in records if numbers[r.class_name] <= boundary]
    test = [r for r in records if numbers[r.class_name] > boundary]
    if not train or not test:
        raise DataError(
            f"expected classes on both sides of class {boundary} (train <= {boundary} < test); "
            f"got {len(train)} train and {len(test)} test images"
        )

    def build(recs: list[Record]) -> ImageDataset:
        order = sorted({r.class_name for r in recs}, key=lambda c: (numbers[c], natural_key(c)))
        return ImageDataset(recs, class_order=order, **kwargs)

    return build(train), build(test)


def read_ebay_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Record]:
    """Records from an "image_id class_id super_class_id path" file (SOP's Ebay_*.txt, the paper's split files).

    Paths are relative to ``root`` (default: the file's folder); class and super-class names are the ids.
    """
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    lines = _read_lines(list_file)
    if not lines or lines[0][1].split() != EBAY_HEADER:
        raise DataError(f"{list_file}: expected the header line '{' '.join(EBAY_HEADER)}'")
    records = []
    for n, line in lines[1:]:
        parts = line.split()
        if len(parts) != 4:
            raise DataError(f"{list_file}:{n}: expected 'image_id class_id super_class_id path', got {line!r}")
        _, cid, sid, rel = parts
        _int_field(cid, f"{list_file}:{n}")
        records.append(Record(str(base / rel), cid, sid))
    if not records:
        raise DataError(f"{list_file} lists no images")
    return records


def _find_root(root: str | os.PathLike, marker: str, subdirs: Sequence[str]) -> Path:
    root = Path(root)
    for cand in [root, *(root / s for s in subdirs)]:
        if (cand / marker).exists():
            return cand
    raise DataError(f"{marker} not found in {root}" + (f" or {', '.join(subdirs)} below it" if subdirs else ""))


# ---------------------------------------------------------------------- CUB-200-2011
def cub200(
    root: str | os.PathLike, *, n_train_classes: int = 100, on_error: str = "raise"
) -> tuple[ImageDataset, ImageDataset]:
    """CUB-200-2011 (``root`` or ``root/CUB_200_2011``): classes 1-100 train, 101-200 test."""
    base = _find_root(root, "images.txt", ["CUB_200_2011"])
    paths = {}
    for n, line in _read_lines(base / "images.txt"):
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{base / 'images.txt'}:{n}: expected 'image_id path', got {line!r}")
        paths[parts[0]] = parts[1]
    labels = {}
    for n, line in _read_lines(base / "image_class_labels.txt"):
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{base / 'image_class_labels.txt'}:{n}: expected 'image_id class_id', got {line!r}")
        labels[parts[0]] = _int_field(parts[1], f"{base / 'image_class_labels.txt'}:{n}")
    missing = set(paths) - set(labels)
    if missing:
        raise DataError(f"{len(missing)} images in images.txt have no class in image_class_labels.txt "
                        f"(e.g. id {sorted(missing, key=natural_key)[0]})")
    numbers: dict[str, int] = {}
    records = []
    for iid in sorted(paths, key=natural_key):
        rel, cid = paths[iid], labels[iid]
        name = rel.split("/")[0] if "/" in rel else str(cid)
        if numbers.setdefault(name, cid) != cid:
            raise DataError(f"CUB folder {name!r} holds images of classes {numbers[name]} and {cid}")
        records.append(Record(str(base / "images" / rel), name))
    return _split_by_class_number(records, numbers, n_train_classes, on_error=on_error)


# ---------------------------------------------------------------------- Cars196
def _cars_from_mat(mat_path: Path) -> tuple[list[Record], dict[str, int]]:
    try:
        from scipy.io import loadmat
    except ImportError as e:  # scipy comes with scikit-learn, but be explicit
        from ctxsim.errors import MissingDependency

        raise MissingDependency("reading cars_annos.mat needs scipy: pip install scipy") from e
    try:
        mat = loadmat(str(mat_path), squeeze_me=True)
        annos = np.atleast_1d(mat["annotations"])
        class_names = [str(x) for x in np.atleast_1d(mat["class_names"])] if "class_names" in mat else None
        rows = [(str(a["relative_im_path"]), int(a["class"])) for a in annos]
    except (KeyError, ValueError, TypeError, IndexError, OSError, NotImplementedError) as e:
        raise DataError(f"cannot read {mat_path}: {e}; expected the official cars_annos.mat") from e
    numbers: dict[str, int] = {}
    records = []
    for rel, cid in rows:
        name = class_names[cid - 1] if class_names and 1 <= cid <= len(class_names) else str(cid)
        numbers[name] = cid
        records.append(Record(str(mat_path.parent / rel), name))
    return records, numbers


def _cars_from_list(list_file: Path) -> tuple[list[Record], dict[str, int]]:
    lines = _read_lines(list_file)
    if lines and lines[0][1].split() == EBAY_HEADER:
        records = [Record(r.source, r.class_name, None, r.path) for r in read_ebay_list(list_file)]
        return records, {r.class_name: int(r.class_name) for r in records}
    ds = ListFileDataset(list_file)
    numbers = {c: _int_field(c, f"{list_file}: label") for c in ds.class_names}
    if numbers and min(numbers.values()) == 0:  # 0-based labels: shift to the standard 1..196
        logger.info("%s has 0-based labels; treating them as classes 1..%d", list_file, max(numbers.values()) + 1)
        numbers = {c: v + 1 for c, v in numbers.items()}
    return [Record(r.source, r.class_name, None, r.path) for r in ds.records], numbers


def _cars_from_folders(root: Path) -> tuple[list[Record], dict[str, int]]:
    classes = scan_class_folders(root)
    if not classes:
        raise DataError(
            f"no Cars196 data in {root}: expected a list file, cars196_train.txt/cars196_test.txt, "
            "cars_annos.mat or one folder per class"
        )
    leading = [re.match(r"\d+", name) for name, _ in classes]
    if all(leading):
        numbers = {name: int(m.group()) for (name, _), m in zip(classes, leading)}  # type: ignore[union-attr]
    else:
        numbers = {name: i + 1 for i, (name, _) in enumerate(classes)}
    return [Record(str(p), name) for name, files in classes for p in files], numbers


def cars196(
    root: str | os.PathLike, *, n_train_classes: int = 98, on_error: str = "raise"
) -> tuple[ImageDataset, ImageDataset]:
    """Cars196: classes 1-98 train, 99-196 test (see the module docstring for the accepted layouts)."""
    root = Path(root)
    if root.is_file():
        records, numbers = _cars_from_list(root)
    elif (root / "cars196_train.txt").is_file() and (root / "cars196_test.txt").is_file():
        records = []
        for f in ("cars196_train.txt", "cars196_test.txt"):
            records += [Record(r.source, r.class_name, None, r.path) for r in read_ebay_list(root / f)]
        numbers = {r.class_name: int(r.class_name) for r in records}
    elif (root / "cars_annos.mat").is_file():
        records, numbers = _cars_from_mat(root / "cars_annos.mat")
    else:
        records, numbers = _cars_from_folders(root)
    return _split_by_class_number(records, numbers, n_train_classes, on_error=on_error)


# ---------------------------------------------------------------------- Stanford Online Products
def sop(root: str | os.PathLike, *, on_error: str = "raise") -> tuple[ImageDataset, ImageDataset]:
    """Stanford Online Products: ``Ebay_train.txt`` (11,318 classes) and ``Ebay_test.txt`` (11,316), super-labels."""
    base = _find_root(root, "Ebay_train.txt", ["Stanford_Online_Products"])
    return (ImageDataset(read_ebay_list(base / "Ebay_train.txt"), on_error=on_error),
            ImageDataset(read_ebay_list(base / "Ebay_test.txt"), on_error=on_error))


# ---------------------------------------------------------------------- In-Shop
def inshop(
    root: str | os.PathLike, *, on_error: str = "raise"
) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """In-Shop Clothes Retrieval: (train, query, gallery) from ``list_eval_partition.txt``.

    The partition file is looked up in ``root`` and ``root/Eval``; image names are resolved against ``root``,
    or ``root/Img`` when that is where they are.
    """
    base = Path(root)
    part = _find_root(base, "list_eval_partition.txt", ["Eval"]) / "list_eval_partition.txt"
    with open(part, encoding="utf-8") as f:
        lines = [s.strip() for s in f]
    lines = [s for s in lines if s]
    if len(lines) < 2 or lines[1].split() != ["image_name", "item_id", "evaluation_status"]:
        raise DataError(f"{part}: expected a count line, then 'image_name item_id evaluation_status'")
    rows = [s.split() for s in lines[2:]]
    for n, r in enumerate(rows, 3):
        if len(r) != 3 or r[2] not in ("train", "query", "gallery"):
            raise DataError(f"{part}:{n}: expected 'image_name item_id train|query|gallery', got {' '.join(r)!r}")
    if lines[0].isdigit() and int(lines[0]) != len(rows):
        raise DataError(f"{part} announces {lines[0]} images but lists {len(rows)}; re-download it")
    img_base = base
    if rows and not (base / rows[0][0]).exists() and (base / "Img" / rows[0][0]).exists():
        img_base = base / "Img"
    splits: dict[str, list[Record]] = {"train": [], "query": [], "gallery": []}
    for name, item, status in rows:
        splits[status].append(Record(str(img_base / name), item))
    for k, v in splits.items():
        if not v:
            raise DataError(f"{part} has no '{k}' images")
    q_items = {r.class_name for r in splits["query"]}
    g_items = {r.class_name for r in splits["gallery"]}
    if q_items != g_items:
        logger.warning("In-Shop: %d query items have no gallery image and %d gallery items no query image",
                       len(q_items - g_items), len(g_items - q_items))
    shared = sorted(q_items | g_items, key=natural_key)
    return (ImageDataset(splits["train"], on_error=on_error),
            ImageDataset(splits["query"], class_order=shared, on_error=on_error),
            ImageDataset(splits["gallery"], class_order=shared, on_error=on_error))


# ---------------------------------------------------------------------- iNaturalist 2021
_INAT_CLASS_SUPER = {
    "Aves": "Birds", "Insecta": "Insects", "Mammalia": "Mammals", "Actinopterygii": "Ray-finned Fishes",
    "Amphibia": "Amphibians", "Reptilia": "Reptiles", "Arachnida": "Arachnids",
}


def inat_supercategory(folder_name: str) -> str:
    """iNat 2021 super-category from a ``NNNNN_Kingdom_Phylum_Class_...`` folder name.

    Plantae -> Plants, Fungi -> Fungi, Mollusca -> Mollusks, Aves/Insecta/Mammalia/Actinopterygii/Amphibia/
    Reptilia/Arachnida -> Birds/Insects/... , other animals -> Animalia; any other kingdom is its own name.
    """
    parts = folder_name.split("_")
    if len(parts) < 4 or not parts[0].isdigit():
        raise DataError(f"iNaturalist class folder {folder_name!r} is not 'NNNNN_Kingdom_Phylum_Class_...'")
    kingdom, phylum, klass = parts[1], parts[2], parts[3]
    if kingdom == "Plantae":
        return "Plants"
    if kingdom != "Animalia":
        return kingdom
    if phylum == "Mollusca":
        return "Mollusks"
    return _INAT_CLASS_SUPER.get(klass, "Animalia")


def _inat_paper_split(base: Path, list_dir: Path) -> tuple[list[Record], list[Record]]:
    out = []
    for name in ("iNaturalist_train.txt", "iNaturalist_test.txt"):
        recs = []
        for n, line in _read_lines(list_dir / name):
            parts = split_line(line)
            if len(parts) != 3:
                raise DataError(f"{list_dir / name}:{n}: expected '<jpg_path>,<super label>,<label>'")
            folder = parts[0].split("/")[0]
            recs.append(Record(str(base / parts[0]), folder, inat_supercategory(folder)))
        out.append(recs)
    return out[0], out[1]


def inat2021(
    root: str | os.PathLike, *, seed: int = 0, on_error: str = "raise"
) -> tuple[ImageDataset, ImageDataset]:
    """iNaturalist 2021 train_mini (``root`` or ``root/train_mini``): species split 50/50 per super-category."""
    root = Path(root)
    base = root / "train_mini" if (root / "train_mini").is_dir() else root
    for list_dir in (root, base):
        if (list_dir / "iNaturalist_train.txt").is_file() and (list_dir / "iNaturalist_test.txt").is_file():
            train, test = _inat_paper_split(base, list_dir)
            break
    else:
        classes = scan_class_folders(base)
        if not classes:
            raise DataError(f"no iNaturalist class folders under {base}")
        by_super: dict[str, list[str]] = {}
        for name, _ in classes:
            by_super.setdefault(inat_supercategory(name), []).append(name)
        rng = np.random.default_rng(seed)
        test_classes: set[str] = set()
        for sup in sorted(by_super):
            names = sorted(by_super[sup], key=natural_key)
            perm = rng.permutation(len(names))
            test_classes.update(names[i] for i in perm[: len(names) // 2])
        records = [Record(str(p), name, inat_supercategory(name)) for name, files in classes for p in files]
        train = [r for r in records if r.class_name not in test_classes]
        test = [r for r in records if r.class_name in test_classes]
    if not train or not test:
        raise DataError(f"iNaturalist split under {base} left an empty side; need >= 2 species per super-category")
    return ImageDataset(train, on_error=on_error), ImageDataset(test, on_error=on_error)


# ---------------------------------------------------------------------- dispatcher
def _folder(root: str | os.PathLike, *, on_error: str = "raise") -> dict[str, ImageDataset]:
    root = Path(root)
    named = [s for s in ("train", "test", "query", "gallery") if (root / s).is_dir()]
    if "train" in named and len(named) > 1:
        return {s: ImageFolderDataset(root / s, on_error=on_error) for s in named}
    return {"all": ImageFolderDataset(root, on_error=on_error)}


def _need_root(name: str, root: str | os.PathLike | None) -> Path:
    if root is None:
        raise ConfigError(f"dataset {name!r} needs a root folder (or file); pass root=...")
    return Path(root)


def open_dataset(
    name: str, root: str | os.PathLike | None = None, split: str | None = None, **kwargs: Any
) -> Any:
    """Open a dataset by name; returns ``{split name: ImageDataset}``, or one dataset when ``split`` is given.

    Names (aliases in brackets) and their splits:
    cub200 [cub] train/test; cars196 [cars] train/test; sop [stanford_online_products] train/test;
    inshop [in-shop] train/query/gallery; inat2021 [inaturalist, inat] train/test;
    omniglot train (= background) / test (= evaluation) (root ``"omniglot-mini"``: the shipped sample);
    omniglot-mini [omniglot_mini] the same splits of the sample shipped in the package (no root);
    digits train/test/all (no root);
    folder: a class-per-folder tree, ``all``, or its train/test/query/gallery sub-trees when ``root`` has them;
    list: a list file (``root``) read by ListFileDataset, ``all`` (pass ``image_root=`` for relative paths).
    Extra keyword arguments go to the reader (e.g. ``on_error="skip"``, ``seed=``).
    """
    key = name.lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in _READERS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(sorted(_READERS))}")
    splits = _READERS[key](root, **kwargs)
    if split is None:
        return splits
    if split not in splits:
        raise ConfigError(f"dataset {name!r} has splits {sorted(splits)}, not {split!r}")
    return splits[split]


def _omniglot_reader(root: Any, **kw: Any) -> dict[str, ImageDataset]:
    from ctxsim.data.omniglot import omniglot

    if root is None:
        raise ConfigError("dataset 'omniglot' needs a root (the folder with the official zips), "
                          "or the shipped sample: --data omniglot-mini")
    return {"train": omniglot(root, "background", **kw), "test": omniglot(root, "evaluation", **kw)}


def _omniglot_mini_reader(root: Any, **kw: Any) -> dict[str, ImageDataset]:
    from ctxsim.data.omniglot import MINI, omniglot

    r = MINI if root is None else root  # a root may name another sample .npz
    return {"train": omniglot(r, "background", **kw), "test": omniglot(r, "evaluation", **kw)}


def _digits_reader(root: Any, **kw: Any) -> dict[str, ImageDataset]:
    from ctxsim.data.digits import digits

    return {s: digits(s, **kw) for s in ("train", "test", "all")}


def _list_reader(root: Any, image_root: Any = None, **kw: Any) -> dict[str, ImageDataset]:
    return {"all": ListFileDataset(_need_root("list", root), image_root, **kw)}


_READERS: dict[str, Callable[..., dict[str, ImageDataset]]] = {
    "cub200": lambda root, **kw: dict(zip(("train", "test"), cub200(_need_root("cub200", root), **kw))),
    "cars196": lambda root, **kw: dict(zip(("train", "test"), cars196(_need_root("cars196", root), **kw))),
    "sop": lambda root, **kw: dict(zip(("train", "test"), sop(_need_root("sop", root), **kw))),
    "inshop": lambda root, **kw: dict(zip(("train", "query", "gallery"), inshop(_need_root("inshop", root), **kw))),
    "inat2021": lambda root, **kw: dict(zip(("train", "test"), inat2021(_need_root("inat2021", root), **kw))),
    "omniglot": _omniglot_reader,
    "omniglot_mini": _omniglot_mini_reader,
    "digits": _digits_reader,
    "folder": lambda root, **kw: _folder(_need_root("folder", root), **kw),
    "list": _list_reader,
}
_ALIASES = {
    "cub": "cub200", "cub_200_2011": "cub200", "cub200_2011": "cub200",
    "cars": "cars196", "stanford_cars": "cars196",
    "stanford_online_products": "sop", "in_shop": "inshop",
    "inaturalist": "inat2021", "inat": "inat2021", "inaturalist2021": "inat2021",
}
KNOWN_DATASETS = tuple(sorted(_READERS))
