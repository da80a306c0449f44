"""Property tests for MPerClassBatchSampler and HierarchicalBatchSampler."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from ctxsim.data import HierarchicalBatchSampler, MPerClassBatchSampler
from ctxsim.errors import ConfigError


def _labels(sizes, seed=0):
    """Shuffled labels with sizes[c] items of class c (so indices are not grouped by class)."""
    lab = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(lab).tolist()


def _check_batch(batch, labels, m, p):
    assert len(batch) == m * p
    cls = [labels[i] for i in batch]
    counts = Counter(cls)
    assert len(counts) == p and set(counts.values()) == {m}
    # laid out class by class
    assert all(len(set(cls[k * m:(k + 1) * m])) == 1 for k in range(p))
    return counts


@pytest.mark.parametrize("m,batch_size", [(2, 8), (4, 16), (5, 30)])
def test_m_per_class_batches(m, batch_size):
    labels = _labels([7, 12, 5, 9, 20, 6, 8, 11, 10, 13])
    s = MPerClassBatchSampler(labels, m=m, batch_size=batch_size, num_batches=25, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == 25
    for b in batches:
        _check_batch(b, labels, m, batch_size // m)
        # enough images in every class here: no repeats within a class
        assert len(set(b)) == len(b)
        assert all(isinstance(i, int) for i in b)


def test_default_num_batches_and_class_coverage():
    labels = _labels([8] * 10)
    s = MPerClassBatchSampler(labels, m=4, batch_size=8)
    assert len(s) == 80 // 8
    batches = list(s)
    # classes cycle: each of the 10 classes appears exactly twice in 10 batches of 2 classes
    per_class = Counter(labels[b[k * 4]] for b in batches for k in range(2))
    assert set(per_class.values()) == {2}
    # images cycle within a class: a class's two chunks of 4 cover its 8 images
    seen: dict[int, set] = {}
    for b in batches:
        for i in b:
            seen.setdefault(labels[i], set()).add(i)
    assert all(len(v) == 8 for v in seen.values())


def test_small_classes_with_replacement_by_default():
    labels = _labels([2, 10, 10, 1])
    s = MPerClassBatchSampler(labels, m=4, batch_size=8, num_batches=40, seed=0)
    small_seen = {0: Counter(), 3: Counter()}
    for b in s:
        counts = _check_batch(b, labels, 4, 2)
        for c in (0, 3):
            if c in counts:
                idx = [i for i in b if labels[i] == c]
                small_seen[c].update(idx)
                # every image of the small class is in its chunk, the rest are repeats
                assert set(idx) == {i for i, y in enumerate(labels) if y == c}
    assert small_seen[0] and small_seen[3]
    assert s.small_classes == [0, 3]


def test_drop_small_classes():
    labels = _labels([2, 10, 10, 1, 6])
    s = MPerClassBatchSampler(labels, m=4, batch_size=8, num_batches=30, drop_small_classes=True)
    used = set()
    for b in s:
        used |= set(_check_batch(b, labels, 4, 2))
        assert len(set(b)) == 8
    assert used == {1, 2, 4}


def test_errors():
    labels = _labels([5, 5, 5])
    with pytest.raises(ConfigError, match="divisible by m"):
        MPerClassBatchSampler(labels, m=3, batch_size=10)
    with pytest.raises(ConfigError, match="at least 2"):
        MPerClassBatchSampler([0] * 10, m=2, batch_size=4)
    with pytest.raises(ConfigError, match="at least 2"):
        MPerClassBatchSampler(_labels([10, 1]), m=2, batch_size=4, drop_small_classes=True)
    with pytest.raises(ConfigError, match="only 3 usable"):
        MPerClassBatchSampler(labels, m=2, batch_size=8)
    with pytest.raises(ConfigError):
        MPerClassBatchSampler(labels, m=2, batch_size=6, world_size=2)  # 3 per rank, not a multiple of 2
    with pytest.raises(ConfigError):
        MPerClassBatchSampler(labels, m=1, batch_size=3, rank=3, world_size=3)
    with pytest.raises(ConfigError):
        MPerClassBatchSampler(labels, m=0, batch_size=4)
    with pytest.raises(ConfigError):
        MPerClassBatchSampler([[0, 1]], m=1, batch_size=2)


def test_set_epoch_is_deterministic():
    labels = _labels([6] * 12)
    a = MPerClassBatchSampler(labels, m=3, batch_size=12, seed=5)
    b = MPerClassBatchSampler(labels, m=3, batch_size=12, seed=5)
    e0 = list(a)
    assert list(a) == e0 and list(b) == e0  # same seed, same epoch -> same batches
    a.set_epoch(1)
    e1 = list(a)
    assert e1 != e0
    b.set_epoch(1)
    assert list(b) == e1
    a.set_epoch(0)
    assert list(a) == e0
    c = MPerClassBatchSampler(labels, m=3, batch_size=12, seed=6)
    assert list(c) != e0


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_concatenate_to_global_batch(world_size):
    labels = _labels([5, 9, 3, 12, 8, 7, 6, 10, 4, 11])
    m, batch_size = 2, 16
    single = MPerClassBatchSampler(labels, m=m, batch_size=batch_size, num_batches=12, seed=9)
    ranks = [MPerClassBatchSampler(labels, m=m, batch_size=batch_size, num_batches=12, seed=9,
                                   rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in (0, 3):
        single.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert all(len(x) == len(single) for x in per_rank)
        for k, glob in enumerate(single):
            parts = [per_rank[r][k] for r in range(world_size)]
            assert all(len(p) == batch_size // world_size for p in parts)
            assert list(itertools.chain.from_iterable(parts)) == glob
            # whole classes per rank
            for p in parts:
                assert set(Counter(labels[i] for i in p).values()) == {m}


def test_hierarchical_batches_span_two_super_classes():
    # 4 super-classes with 6, 5, 4, 1 classes of 6 images; class c belongs to super sup_of[c]
    sup_of = [0] * 6 + [1] * 5 + [2] * 4 + [3]
    labels = _labels([6] * len(sup_of))
    supers = [sup_of[y] for y in labels]
    m, batch_size = 3, 24  # P = 8 classes: 4 from each of 2 super-classes
    s = HierarchicalBatchSampler(labels, supers, batch_size=batch_size, m=m, num_batches=30, seed=2)
    pairs = Counter()
    for b in s:
        counts = _check_batch(b, labels, m, 8)
        sup_counts = Counter(sup_of[c] for c in counts)
        assert len(sup_counts) == 2 and set(sup_counts.values()) == {4}
        # first half of the batch from one super-class, second half from the other
        assert len({supers[i] for i in b[:12]}) == 1 and len({supers[i] for i in b[12:]}) == 1
        pairs[frozenset(sup_counts)] += 1
    assert 3 not in {x for p in pairs for x in p}  # super-class 3 has too few classes for half a batch
    assert len(pairs) == 3  # all pairs of the eligible super-classes 0, 1, 2 occur
    # determinism and sharding: 2 ranks each get one super-class half
    r0 = HierarchicalBatchSampler(labels, supers, batch_size, m, num_batches=30, seed=2, rank=0, world_size=2)
    r1 = HierarchicalBatchSampler(labels, supers, batch_size, m, num_batches=30, seed=2, rank=1, world_size=2)
    assert [a + b for a, b in zip(r0, r1)] == list(s)


def test_hierarchical_errors():
    labels = _labels([4] * 6)
    with pytest.raises(ConfigError, match="at least 2 super-classes"):
        HierarchicalBatchSampler(labels, [0] * len(labels), batch_size=8, m=2)
    supers = [y % 2 for y in labels]
    with pytest.raises(ConfigError, match="even"):
        HierarchicalBatchSampler(labels, supers, batch_size=6, m=2)
    lab9 = _labels([4] * 9)
    with pytest.raises(ConfigError, match="2 super-classes with at least 4"):
        HierarchicalBatchSampler(lab9, [y % 3 for y in lab9], batch_size=16, m=2)  # 3 classes per super
    bad = list(supers)
    i = next(k for k, y in enumerate(labels) if y == 0)
    bad[i] = 1 - bad[i]
    with pytest.raises(ConfigError, match="more than one super-class"):
        HierarchicalBatchSampler(labels, bad, batch_size=8, m=2)
    with pytest.raises(ConfigError):
        HierarchicalBatchSampler(labels, supers[:-1], batch_size=8, m=2)
    with pytest.raises(ConfigError):
        HierarchicalBatchSampler(labels, None, batch_size=8, m=2)


def test_drawing_more_than_a_cycle_holds_is_config_error():
    from ctxsim.data.samplers import _Cycle

    with pytest.raises(ConfigError, match="cannot draw 4 distinct items"):
        _Cycle(np.arange(3), np.random.default_rng(0)).take(4)
