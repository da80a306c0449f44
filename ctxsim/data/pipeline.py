"""From a TrainConfig to ready-to-use training and evaluation data: datasets, splits, transforms, sampler, loader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ctxsim.errors import ConfigError

if TYPE_CHECKING:
    from typing import TypeAlias

    from torch.utils.data import DataLoader

    from ctxsim.data.datasets import ImageDataset
    from ctxsim.data.device_decode import DeviceAugment
    from ctxsim.data.samplers import HierarchicalBatchSampler, MPerClassBatchSampler

    #: an evaluation split: a dataset (leave-one-out), or a (query, gallery) pair sharing one label space (In-Shop)
    EvalSplit: TypeAlias = ImageDataset | tuple[ImageDataset, ImageDataset]

__all__ = ["RunData", "build_datasets", "open_eval_dataset", "open_eval_split"]


@dataclass
class RunData:
    train: ImageDataset           # with the train transform
    test: EvalSplit               # held-out classes (eval transform)
    val: ImageDataset | None      # validation classes split off the training set, or None
    sampler: MPerClassBatchSampler | HierarchicalBatchSampler
    loader: DataLoader[Any]
    augment: DeviceAugment | None = None  # data.decode=device: turns the loader's encoded bytes into a batch

    def eval_sets(self) -> dict[str, EvalSplit]:
        return {"val": self.val, "test": self.test} if self.val is not None else {"test": self.test}


def _open(cfg) -> tuple:
    from ctxsim.data.layouts import open_dataset

    splits = open_dataset(cfg.data.dataset, cfg.data.root, on_error=cfg.data.on_error)
    if "query" in splits:
        return splits["train"], (splits["query"], splits["gallery"])
    if "test" in splits:
        return splits["train"], splits["test"]
    # a plain folder or list file: hold out whole classes for testing, deterministically
    from ctxsim.data.datasets import class_disjoint_split

    return class_disjoint_split(splits["all"], holdout_fraction=cfg.data.test_classes, seed=cfg.seed)


def _noisy(train, fraction: float, seed: int):
    """Replace ``fraction`` of the training labels by labels drawn uniformly at random (robustness studies)."""
    from ctxsim.data.datasets import Record

    rng = np.random.default_rng(seed + 7919)
    records = list(train.records)
    flip = rng.random(len(records)) < fraction
    names = train.class_names
    new = [Record(r.source, names[rng.integers(len(names))], r.super_name, r.path) if f else r
           for r, f in zip(records, flip)]
    return train.with_records(new, names, train.super_class_names)


def _set_eval_transform(split, preprocess) -> None:
    """Give a test split (a dataset, or a (query, gallery) pair) the deterministic eval transform."""
    from ctxsim.data.transforms import eval_transform

    for ds in split if isinstance(split, tuple) else (split,):
        ds.transform = eval_transform(preprocess)


def build_datasets(cfg, rank: int = 0, world_size: int = 1, device=None) -> RunData:
    """Datasets, sampler and loader; under DDP the sampler yields rank ``rank``'s chunk of each global batch.

    ``device`` is the training device (CUDA pins loader memory; data.decode=device decodes there); default: from
    ``cfg.device``.
    """
    from ctxsim.data.datasets import class_disjoint_split
    from ctxsim.data.samplers import HierarchicalBatchSampler, MPerClassBatchSampler
    from ctxsim.data.transforms import eval_transform, make_loader, train_transform

    d = cfg.data
    train, test = _open(cfg)
    val = None
    if d.val_classes:
        by = "super" if train.super_labels is not None and d.sampler != "hierarchical" else "class"
        train, val = class_disjoint_split(train, holdout_fraction=d.val_classes, seed=cfg.seed, by=by)
        val.transform = eval_transform(cfg.preprocess)
    if d.label_noise:
        train = _noisy(train, d.label_noise, cfg.seed)
    train.transform = train_transform(cfg.preprocess, scale=tuple(d.train_scale), hflip=d.flip)
    _set_eval_transform(test, cfg.preprocess)
    common = dict(batch_size=d.batch_size, m=d.m, num_batches=d.batches_per_epoch, seed=cfg.seed,
                  rank=rank, world_size=world_size)
    sampler: MPerClassBatchSampler | HierarchicalBatchSampler
    if d.sampler == "hierarchical":
        sampler = HierarchicalBatchSampler(train.labels, train.super_labels, **common)
    elif d.sampler == "m_per_class":
        sampler = MPerClassBatchSampler(train.labels, **common)
    else:
        raise ConfigError(f"data.sampler must be m_per_class or hierarchical, got {d.sampler!r}")
    if device is None:
        device = "cuda" if cfg.device.startswith("cuda") else "cpu"
    if d.decode == "device":  # the loader only reads bytes; the training device decodes and augments
        from ctxsim.data.device_decode import DeviceAugment, EncodedImages, collate_encoded

        loader = make_loader(EncodedImages(train), batch_sampler=sampler, num_workers=d.num_workers, device=device,
                             collate_fn=collate_encoded)
        augment = DeviceAugment(cfg.preprocess, tuple(d.train_scale), d.flip, device)
        return RunData(train, test, val, sampler, loader, augment)
    loader = make_loader(train, batch_sampler=sampler, num_workers=d.num_workers, device=device)
    return RunData(train, test, val, sampler, loader)


def open_eval_split(cfg, preprocess):
    """The run's whole evaluation split with the eval transform: a dataset, or a (query, gallery) pair."""
    _, test = _open(cfg)
    _set_eval_transform(test, preprocess)
    return test


def open_eval_dataset(cfg, preprocess, limit: int | None = None):
    """The run's held-out evaluation images with the eval transform; ``limit`` keeps a deterministic subset
    of whole classes (the first classes in label order) totalling at most ``limit`` images."""
    from ctxsim.data.datasets import subset

    test = open_eval_split(cfg, preprocess)
    if isinstance(test, tuple):
        raise ConfigError("this dataset evaluates with separate query and gallery sets; use its gallery folder")
    if limit is not None and limit < len(test):
        labels = np.asarray(test.labels)
        keep: list[int] = []
        total = 0
        for c in range(test.num_classes):
            idx = np.flatnonzero(labels == c)
            if total + len(idx) > limit and keep:
                break
            keep.extend(idx.tolist())
            total += len(idx)
        test = subset(test, sorted(keep))  # keeps the transform
    return test
