"""Tests for ctxsim.evaluate: hand-computed cases, pytorch-metric-learning's AccuracyCalculator, chunking, memory."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ctxsim.errors import ConfigError, DataError
from ctxsim.evaluate import format_metrics, retrieval_metrics
from ctxsim.knn import knn


def _on_circle(degrees) -> np.ndarray:
    a = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


# Five points on the unit circle; similarity falls with the angle between them, so the ranking is by |angle|.
HAND_ANGLES = [0, 12, 27, 40, 71]
HAND_LABELS = ["a", "a", "b", "a", "b"]


def test_hand_made_leave_one_out():
    # Neighbours of each query (by angular distance) and whether they share its label:
    #   a@0 : a@12 (12), b@27 (27), a@40 (40), b@71 (71) -> [1,0,1,0], R=2
    #   a@12: a@0  (12), b@27 (15), a@40 (28), b@71 (59) -> [1,0,1,0], R=2
    #   b@27: a@40 (13), a@12 (15), a@0  (27), b@71 (44) -> [0,0,0,1], R=1
    #   a@40: b@27 (13), a@12 (28), b@71 (31), a@0  (40) -> [0,1,0,1], R=2
    #   b@71: a@40 (31), b@27 (44), a@12 (59), a@0  (71) -> [0,1,0,0], R=1
    # R@1: hits for a@0, a@12                              -> 2/5 = 0.4
    # R@2: + a@40 (pos 2), b@71 (pos 2)                    -> 4/5 = 0.8
    # R@4: + b@27 (pos 4)                                  -> 5/5 = 1.0
    # R-precision (hits in the first R, / R): 1/2, 1/2, 0/1, 1/2, 0/1 -> 1.5/5 = 0.3
    # AP@R: a@0: (P(1)=1)/2 = 0.5; a@12: 0.5; b@27: 0; a@40: (P(2)=1/2)/2 = 0.25; b@71: 0
    #       MAP@R = (0.5 + 0.5 + 0 + 0.25 + 0)/5 = 1.25/5 = 0.25
    x = _on_circle(HAND_ANGLES)
    m = retrieval_metrics(x, HAND_LABELS, ks=(1, 2, 4))
    assert list(m) == ["R@1", "R@2", "R@4", "MAP@R", "R-precision"]
    assert m["R@1"] == pytest.approx(0.4)
    assert m["R@2"] == pytest.approx(0.8)
    assert m["R@4"] == pytest.approx(1.0)
    assert m["MAP@R"] == pytest.approx(0.25)
    assert m["R-precision"] == pytest.approx(0.3)


def test_hand_made_lone_query_is_skipped_and_recall_capped_at_gallery():
    # A lone item "c" at 180 degrees: it has no same-label item so it is not a query (as in
    # AccuracyCalculator), and it is farther than every other neighbour (>= 109 degrees vs <= 71), so it only
    # appears last in everyone's ranking: the other five queries give the same numbers as above.
    # K=50 exceeds the gallery (5 others): all neighbours are used, so R@50 = 1.
    x = _on_circle(HAND_ANGLES + [180])
    labels = HAND_LABELS + ["c"]
    m = retrieval_metrics(x, labels, ks=(4, 1, 2, 50))
    assert m == pytest.approx({"R@1": 0.4, "R@2": 0.8, "R@4": 1.0, "R@50": 1.0, "MAP@R": 0.25, "R-precision": 0.3})


def test_hand_made_separate_queries():
    # Gallery: a@0, b@30, a@60, b@100. Queries:
    #   a@20 : b@30 (10), a@0 (20), a@60 (40), b@100 (80) -> [0,1,1,0], R=2 (two a's in the gallery)
    #          R@1 miss, R@2 hit; R-prec 1/2; AP@R = (P(2)=1/2)/2 = 0.25
    #   b@95 : b@100 (5), a@60 (35), b@30 (65), a@0 (95) -> [1,0,1,0], R=2
    #          R@1 hit; R-prec 1/2; AP@R = (P(1)=1)/2 = 0.5
    #   z@10 : no "z" in the gallery -> skipped
    # R@1 = 1/2, R@2 = 2/2, R-precision = (0.5+0.5)/2 = 0.5, MAP@R = (0.25+0.5)/2 = 0.375
    g = _on_circle([0, 30, 60, 100])
    q = _on_circle([20, 95, 10])
    m = retrieval_metrics(g, [0, 1, 0, 1], ks=(1, 2), query_embeddings=q, query_labels=[0, 1, 7])
    assert m == pytest.approx({"R@1": 0.5, "R@2": 1.0, "MAP@R": 0.375, "R-precision": 0.5})


def _clustered(seed: int, n: int, n_classes: int, dim: int = 16, noise: float = 1.2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    centres = rng.normal(size=(n_classes, dim))
    x = centres[labels] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _pml(query, query_labels, reference=None, reference_labels=None, same_neighbours=False):
    """AccuracyCalculator's precision_at_1, mean_average_precision_at_r, r_precision.

    By default it runs its own FAISS L2 search. Neighbours whose scores differ by ~1e-8 may then come in a
    different order than our inner-product search (rounding), which moves MAP@R by ~1e-8: compare with a
    tolerance. With ``same_neighbours=True`` it is fed our torch kNN, so the metric formulas must agree exactly.
    """
    acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")

    def our_knn(q, k, ref, ref_includes_query):
        s, i = knn(q.cpu().numpy(), ref.cpu().numpy(), k, exclude_self=ref_includes_query, backend="torch")
        return torch.from_numpy(s), torch.from_numpy(i)

    calc = acc.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=our_knn if same_neighbours else None,
    )
    if reference is None:  # leave-one-out: reference is the query set, own match excluded
        return calc.get_accuracy(query, query_labels)
    return calc.get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query=False)


def _assert_matches_pml(m, *args):
    exact = _pml(*args, same_neighbours=True)
    own_search = _pml(*args)
    for ours, theirs in (("R@1", "precision_at_1"), ("MAP@R", "mean_average_precision_at_r"),
                         ("R-precision", "r_precision")):
        assert m[ours] == pytest.approx(exact[theirs], abs=1e-12), ours
        assert m[ours] == pytest.approx(own_search[theirs], abs=1e-6), ours


def _brute_recall(q, ql, g, gl, ks, loo):
    s = q.astype(np.float64) @ g.astype(np.float64).T
    if loo:
        np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    same = gl[order] == ql[:, None]
    if loo:
        same = same[:, :-1]  # the last column is the query itself
    r = (gl[None, :] == ql[:, None]).sum(1) - (1 if loo else 0)
    same = same[r > 0]
    return {k: float(same[:, :k].any(1).mean()) for k in ks}


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("chunk_size", [None, 37])
def test_matches_accuracy_calculator_leave_one_out(backend, chunk_size):
    if backend == "faiss":
        pytest.importorskip("faiss")
    x, labels = _clustered(0, 600, 40)
    labels[0] = 1000  # one singleton class: a lone query, skipped by both
    m = retrieval_metrics(x, labels, ks=(1, 2, 4, 8, 16), chunk_size=chunk_size, backend=backend)
    _assert_matches_pml(m, x, labels)
    brute = _brute_recall(x, labels, x, labels, (1, 2, 4, 8, 16), loo=True)
    for k, v in brute.items():
        assert m[f"R@{k}"] == pytest.approx(v, abs=1e-12)
    assert 0.05 < m["MAP@R"] < 0.9  # the data are neither trivial nor hopeless


@pytest.mark.parametrize("chunk_size", [None, 1, 50])
def test_matches_accuracy_calculator_separate_query_set(chunk_size):
    x, labels = _clustered(1, 700, 25)
    q, ql, g, gl = x[:250], labels[:250].copy(), x[250:], labels[250:]
    ql[:3] = 999  # queries whose class is absent from the gallery: skipped by both
    m = retrieval_metrics(g, gl, ks=(1, 3, 10), query_embeddings=q, query_labels=ql, chunk_size=chunk_size)
    _assert_matches_pml(m, q, ql, g, gl)
    brute = _brute_recall(q, ql, g, gl, (1, 3, 10), loo=False)
    for k, v in brute.items():
        assert m[f"R@{k}"] == pytest.approx(v, abs=1e-12)


def test_huge_class_is_chunked_by_its_own_r(monkeypatch):
    # One class holds half the data (R = 299): with a tiny budget the chunks of that class must shrink,
    # the others stay narrow, and the result must still equal AccuracyCalculator's.
    import ctxsim.evaluate as ev

    x, labels = _clustered(2, 600, 60, noise=0.8)
    labels[:300] = 100  # a class of its own (the random labels are 0..59)
    seen = []
    real_search = ev.ExactSearcher.search

    def spy(self, queries, k, self_indices=None):
        seen.append((queries.shape[0], k))
        return real_search(self, queries, k, self_indices)

    monkeypatch.setattr(ev.ExactSearcher, "search", spy)
    monkeypatch.setattr(ev, "DEFAULT_CHUNK_BYTES", 48 * 299 * 20)  # room for 20 rows at k = 299
    m = retrieval_metrics(x, labels, ks=(1, 5))
    monkeypatch.undo()
    _assert_matches_pml(m, x, labels)
    n_lone = int((np.bincount(labels)[labels] == 1).sum())  # singletons are not queries
    assert sum(rows for rows, _ in seen) == 600 - n_lone
    assert all(rows * k <= 299 * 20 for rows, k in seen)
    assert max(k for _, k in seen) == 299
    assert min(k for _, k in seen) < 50  # small classes did not pay for the big one


def test_recall_monotone_in_k_and_chunking_invariant():
    x, labels = _clustered(3, 400, 30)
    ks = (1, 2, 4, 8, 16, 32)
    m = retrieval_metrics(x, labels, ks=ks)
    recalls = [m[f"R@{k}"] for k in ks]
    assert all(a <= b for a, b in itertools.pairwise(recalls))
    assert recalls[0] < recalls[-1]
    for v in m.values():
        assert 0.0 <= v <= 1.0
    for cs in (1, 33, 10_000):
        assert retrieval_metrics(x, labels, ks=ks, chunk_size=cs) == pytest.approx(m, abs=1e-12)
    # torch tensors in, same numbers out
    assert retrieval_metrics(torch.from_numpy(x), torch.from_numpy(labels), ks=ks) == pytest.approx(m, abs=1e-12)


def test_perfect_embeddings_score_one():
    labels = np.repeat(np.arange(5), 4)
    x = np.eye(8, dtype=np.float32)[labels]  # every class is one point
    m = retrieval_metrics(x, labels, ks=(1, 3))
    assert m == pytest.approx({"R@1": 1.0, "R@3": 1.0, "MAP@R": 1.0, "R-precision": 1.0})


def test_progress_callback():
    x, labels = _clustered(4, 90, 9)
    calls = []
    retrieval_metrics(x, labels, chunk_size=40, progress=lambda d, t: calls.append((d, t)))
    assert [d for d, _ in calls] == [40, 80, 90] and {t for _, t in calls} == {90}


def test_errors():
    x, labels = _clustered(5, 20, 4)
    with pytest.raises(ConfigError, match="one label per item"):
        retrieval_metrics(x, labels[:-1])
    with pytest.raises(ConfigError, match="both query_embeddings and query_labels"):
        retrieval_metrics(x, labels, query_embeddings=x)
    with pytest.raises(ConfigError, match="ks must be"):
        retrieval_metrics(x, labels, ks=(0, 1))
    with pytest.raises(ConfigError, match="ks must be"):
        retrieval_metrics(x, labels, ks=())
    with pytest.raises(ConfigError, match="dimension"):
        retrieval_metrics(x, labels, query_embeddings=x[:, :3], query_labels=labels)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        retrieval_metrics(bad, labels)
    with pytest.raises(DataError, match="no query has a same-label item"):
        retrieval_metrics(x[:4], [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="chunk_size"):
        retrieval_metrics(x, labels, chunk_size=0)


def test_format_metrics():
    line = format_metrics({"MAP@R": 0.3456, "R@2": 0.7, "R-precision": 0.4, "R@1": 0.6123, "R@10": 0.9})
    assert line == "R@1 0.612  R@2 0.700  R@10 0.900  MAP@R 0.346  R-precision 0.400"
    assert format_metrics({"R@1": 0.5}, digits=1) == "R@1 0.5"


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np, torch
    from ctxsim.evaluate import retrieval_metrics
    n, d, n_classes = 60_000, 512, 11_316
    torch.manual_seed(0)
    x = torch.empty(n, d, dtype=torch.float32).normal_()
    x.div_(x.norm(dim=1, keepdim=True))             # in place: no second copy
    labels = np.random.default_rng(0).permutation(np.arange(n) % n_classes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    m = retrieval_metrics(x, labels, ks=(1, 10, 100, 1000))
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"metrics": m, "seconds": seconds, "before": before, "after": after}))
    """
)


@pytest.mark.slow
def test_sop_scale_memory_and_time():
    """60,000 x 512 (Stanford Online Products test size), ~5.3 items per class, in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = out["after"] - out["before"]
    full_matrix = 60_000 * 60_000 * 4  # 14.4 GB
    print(f"\nSOP-scale evaluation: {out['seconds']:.1f} s, peak RSS growth {extra / 2**20:.0f} MiB, {out['metrics']}")
    assert extra < 1.5 * 2**30, f"peak RSS grew by {extra / 2**30:.2f} GiB"
    assert extra < full_matrix / 10
    for v in out["metrics"].values():
        assert 0.0 <= v <= 1.0
    # random embeddings: about chance level (R=4..5 positives among 59,999 -> R@1000 ~ 0.07)
    assert out["metrics"]["R@1"] < 0.01
    assert out["metrics"]["R@1000"] < 0.2
