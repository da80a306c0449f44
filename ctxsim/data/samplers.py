"""Batch samplers for metric learning: P classes x m images per batch, optionally from two super-classes, DDP-sharded.

Both yield lists of dataset indices (a DataLoader ``batch_sampler``), a global batch laid out class by class.
``batch_size`` is the global batch: with ``world_size > 1`` every rank computes the same one and yields its
contiguous chunk (whole classes), so the ranks' chunks in rank order are the single-process batch
(docs/DISTRIBUTED.md). The order depends only on (seed, epoch): call ``set_epoch`` before each epoch. Classes come
from a shuffled cycle and each class's images from their own, so an epoch covers the data evenly; a class with
fewer than m images is sampled with replacement (``drop_small_classes=True``: never).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ctxsim.errors import ConfigError

__all__ = ["HierarchicalBatchSampler", "MPerClassBatchSampler"]


class _Cycle:
    """Endless shuffled cycle over ``items``; ``take(k)`` returns k distinct items (k <= len(items))."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator) -> None:
        self.items = np.asarray(items)
        self.rng = rng
        self.perm = rng.permutation(self.items)
        self.pos = 0

    def take(self, k: int) -> list[int]:
        n = len(self.items)
        if k > n:
            raise ConfigError(f"cannot draw {k} distinct items (classes or images) from {n}; lower batch_size or m")
        out = self.perm[self.pos:self.pos + k].tolist()
        self.pos += len(out)
        if len(out) < k:
            taken = set(out)
            fresh = self.rng.permutation(self.items).tolist()
            rest = [x for x in fresh if x not in taken]
            need = k - len(out)
            out += rest[:need]
            # items just used go to the end of the new cycle
            self.perm = np.asarray(rest + [x for x in fresh if x in taken])
            self.pos = need
        return out


def _as_labels(labels: Sequence[int], what: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"{what} must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{what} must be ints, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class _ClassBatchSampler(Sampler[list[int]]):
    """Shared parts: validation, per-class image pools, epoch seeding and rank sharding."""

    def __init__(
        self,
        labels: Sequence[int],
        m: int,
        batch_size: int,
        num_batches: int | None,
        seed: int,
        rank: int,
        world_size: int,
        drop_small_classes: bool,
    ) -> None:
        self.m = _int("m", m, 1)
        self.batch_size = _int("batch_size", batch_size, 1)
        self.world_size = _int("world_size", world_size, 1)
        self.rank = _int("rank", rank, 0)
        self.seed = _int("seed", seed, 0)
        if self.rank >= self.world_size:
            raise ConfigError(f"rank must be in [0, {self.world_size - 1}], got {rank}")
        if self.batch_size % self.m:
            raise ConfigError(f"batch_size ({batch_size}) must be divisible by m ({m})")
        if self.batch_size % self.world_size or (self.batch_size // self.world_size) % self.m:
            raise ConfigError(
                f"the global batch_size ({batch_size}) must split into {world_size} ranks of a multiple of "
                f"m ({m}) each; use a batch_size divisible by m * world_size = {self.m * self.world_size}"
            )
        self.local_batch_size = self.batch_size // self.world_size
        self.classes_per_batch = self.batch_size // self.m
        self.drop_small_classes = bool(drop_small_classes)
        self.labels = _as_labels(labels)
        n = len(self.labels)
        order = np.argsort(self.labels, kind="stable")
        classes, starts, counts = np.unique(self.labels[order], return_index=True, return_counts=True)
        self._items = {int(c): order[s:s + k] for c, s, k in zip(classes, starts, counts)}
        usable = [int(c) for c, k in zip(classes, counts) if k >= self.m or not self.drop_small_classes]
        self.usable_classes = np.asarray(usable, dtype=np.int64)
        self.small_classes = [int(c) for c, k in zip(classes, counts) if k < self.m]
        if len(usable) < 2:
            raise ConfigError(
                f"need at least 2 classes with images to sample from, got {len(usable)}"
                + (f" (dropped {len(self.small_classes)} with fewer than m={m} images)"
                   if self.drop_small_classes and self.small_classes else "")
            )
        if self.classes_per_batch > len(usable):
            raise ConfigError(
                f"batch_size/m = {self.classes_per_batch} classes per batch but only {len(usable)} usable classes; "
                "lower batch_size or raise m"
            )
        if num_batches is None:
            num_batches = max(1, n // self.batch_size)
        self.num_batches = _int("num_batches", num_batches, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch; the batches are a deterministic function of (seed, epoch)."""
        self.epoch = _int("epoch", epoch, 0)

    def __len__(self) -> int:
        return self.num_batches

    def _class_chunk(self, c: int, pools: dict, rng: np.random.Generator) -> list[int]:
        items = self._items[c]
        if len(items) < self.m:  # sampled with replacement: all items once, then random repeats
            extra = rng.choice(items, self.m - len(items), replace=True)
            return rng.permutation(items).tolist() + extra.tolist()
        pool = pools.get(c)
        if pool is None:
            pool = pools[c] = _Cycle(items, rng)
        return pool.take(self.m)

    def _global_classes(self, rng: np.random.Generator) -> Iterator[list[int]]:
        raise NotImplementedError

    def global_batches(self) -> Iterator[list[int]]:
        """This epoch's global batches (what a single process would yield), before rank sharding."""
        rng = np.random.default_rng([self.seed, self.epoch])
        pools: dict = {}
        classes = self._global_classes(rng)
        for _ in range(self.num_batches):
            batch: list[int] = []
            for c in next(classes):
                batch.extend(self._class_chunk(c, pools, rng))
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.local_batch_size
        hi = lo + self.local_batch_size
        for batch in self.global_batches():
            yield [int(i) for i in batch[lo:hi]]


class MPerClassBatchSampler(_ClassBatchSampler):
    """Batches of P = batch_size/m distinct classes x exactly m images each (see the module docstring).

    ``num_batches`` defaults to ``len(labels) // batch_size`` (at least 1). Raises ConfigError when batch_size is
    not divisible by m (or by m * world_size), when fewer than 2 classes are usable, or when P exceeds them.
    """

    def __init__(
        self,
        labels: Sequence[int],
        m: int,
        batch_size: int,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_small_classes: bool = False,
    ) -> None:
        super().__init__(labels, m, batch_size, num_batches, seed, rank, world_size, drop_small_classes)

    def _global_classes(self, rng: np.random.Generator) -> Iterator[list[int]]:
        cycle = _Cycle(self.usable_classes, rng)
        while True:
            yield cycle.take(self.classes_per_batch)


class HierarchicalBatchSampler(_ClassBatchSampler):
    """Batches whose classes come from two super-classes, half from each, m images per class.

    As in the paper's SOP and iNaturalist setup: each batch picks two distinct super-classes (a shuffled cycle
    over the eligible ones) and P/2 distinct classes from each. P = batch_size/m must be even, and a super-class is
    eligible when it has at least P/2 usable classes. Each class must belong to exactly one super-class.
    """

    def __init__(
        self,
        labels: Sequence[int],
        super_labels: Sequence[int],
        batch_size: int,
        m: int,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_small_classes: bool = False,
    ) -> None:
        super().__init__(labels, m, batch_size, num_batches, seed, rank, world_size, drop_small_classes)
        if super_labels is None:
            raise ConfigError("HierarchicalBatchSampler needs super_labels; this dataset has none")
        sup = _as_labels(super_labels, "super_labels")
        if len(sup) != len(self.labels):
            raise ConfigError(f"super_labels has {len(sup)} entries but labels has {len(self.labels)}")
        pairs = np.unique(np.stack([self.labels, sup], axis=1), axis=0)
        if len(np.unique(pairs[:, 0])) != len(pairs):
            bad = pairs[np.flatnonzero(np.diff(pairs[:, 0]) == 0)[0], 0]
            raise ConfigError(f"class {int(bad)} appears under more than one super-class")
        class_super = {int(c): int(s) for c, s in pairs}
        n_super = len(np.unique(sup))
        if n_super < 2:
            raise ConfigError(
                f"HierarchicalBatchSampler needs at least 2 super-classes, got {n_super}; "
                "use MPerClassBatchSampler"
            )
        if self.classes_per_batch % 2:
            raise ConfigError(
                f"batch_size/m = {self.classes_per_batch} classes per batch must be even (half from each of two "
                "super-classes)"
            )
        self.half = self.classes_per_batch // 2
        by_super: dict[int, list[int]] = {}
        for c in self.usable_classes.tolist():
            by_super.setdefault(class_super[c], []).append(c)
        self._super_classes = {s: np.asarray(cs) for s, cs in by_super.items() if len(cs) >= self.half}
        if len(self._super_classes) < 2:
            raise ConfigError(
                f"need 2 super-classes with at least {self.half} usable classes each (half a batch), got "
                f"{len(self._super_classes)} of {n_super}; lower batch_size or raise m"
            )

    def _global_classes(self, rng: np.random.Generator) -> Iterator[list[int]]:
        supers = _Cycle(np.asarray(sorted(self._super_classes)), rng)
        within = {s: _Cycle(cs, rng) for s, cs in self._super_classes.items()}
        while True:
            a, b = supers.take(2)
            yield within[a].take(self.half) + within[b].take(self.half)
