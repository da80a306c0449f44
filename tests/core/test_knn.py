"""Tests for ctxsim.knn: chunked exact search equals a brute-force full-matrix search; FAISS agrees; errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctxsim.errors import ConfigError
from ctxsim.knn import auto_chunk_size, knn

TIE_GAP = 1e-4  # score gaps below this are treated as ties (float32 rounding may swap such neighbours)


def _normed(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute(q: np.ndarray, g: np.ndarray, k: int, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Full Q x N similarity matrix in float64, sorted: the reference."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


def _assert_same_neighbours(q, g, scores, indices, ref_s, ref_i, exclude_self=False):
    k = ref_i.shape[1]
    assert scores.shape == indices.shape == ref_i.shape
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    # Scores are the k best, sorted.
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # Each returned index really has the returned score, no duplicates, never the query itself.
    s_true = np.einsum("qd,qkd->qk", q.astype(np.float64), g.astype(np.float64)[indices])
    np.testing.assert_allclose(scores, s_true, atol=1e-5)
    for row in indices:
        assert len(set(row.tolist())) == k
    if exclude_self:
        assert not np.any(indices == np.arange(len(q))[:, None])
    # Indices equal the reference wherever the reference score is separated from its neighbours.
    full = ref_s
    gap_prev = np.concatenate([np.full((len(q), 1), np.inf), full[:, :-1] - full[:, 1:]], axis=1)
    gap_next = np.concatenate([full[:, :-1] - full[:, 1:], np.full((len(q), 1), np.inf)], axis=1)
    distinct = (gap_prev > TIE_GAP) & (gap_next > TIE_GAP)
    assert distinct.mean() > 0.9  # the comparison is not vacuous
    np.testing.assert_array_equal(indices[distinct], ref_i[distinct])


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 203, 1000])
def test_torch_matches_brute_force(chunk_size):
    rng = np.random.default_rng(0)
    q, g = _normed(rng, 53, 24), _normed(rng, 203, 24)
    k = 10
    s, i = knn(q, g, k, chunk_size=chunk_size, backend="torch")
    _assert_same_neighbours(q, g, s, i, *_brute(q, g, k))


@pytest.mark.parametrize("chunk_size", [None, 5, 13, 100])
def test_exclude_self_matches_brute_force(chunk_size):
    rng = np.random.default_rng(1)
    x = _normed(rng, 100, 16)
    k = 9
    s, i = knn(x, x, k, exclude_self=True, chunk_size=chunk_size)
    _assert_same_neighbours(x, x, s, i, *_brute(x, x, k, exclude_self=True), exclude_self=True)
    # Without exclusion every item finds itself first (score 1).
    s2, i2 = knn(x, x, 1, chunk_size=chunk_size)
    np.testing.assert_array_equal(i2[:, 0], np.arange(100))
    np.testing.assert_allclose(s2[:, 0], 1.0, atol=1e-5)


def test_exclude_self_with_full_k_returns_everyone_else():
    rng = np.random.default_rng(2)
    x = _normed(rng, 12, 4)
    s, i = knn(x, x, 11, exclude_self=True, chunk_size=5)
    for row, idx in enumerate(i):
        assert sorted(idx.tolist()) == [j for j in range(12) if j != row]
    assert np.all(np.isfinite(s))


def test_exclude_self_with_duplicates_never_returns_self():
    rng = np.random.default_rng(3)
    base = _normed(rng, 4, 8)
    x = np.repeat(base, 5, axis=0)  # 5 identical copies of each vector: heavy exact ties
    for backend in ("torch", "faiss"):
        # k=4: the 4 others of one's own group are the top 4 (score 1); k=2: more ties than k+1, so FAISS's
        # k+1 results may not even contain the query itself.
        for k in (4, 2):
            s, i = knn(x, x, k, exclude_self=True, chunk_size=3, backend=backend)
            assert not np.any(i == np.arange(20)[:, None]), backend
            np.testing.assert_allclose(s, 1.0, atol=1e-5)
            assert np.all(i // 5 == (np.arange(20) // 5)[:, None]), backend
            assert all(len(set(row)) == k for row in i.tolist())


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 11])
def test_faiss_matches_torch(exclude_self, chunk_size):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(4)
    g = _normed(rng, 150, 32)
    q = g if exclude_self else _normed(rng, 40, 32)
    k = 8
    s_t, i_t = knn(q, g, k, exclude_self=exclude_self, chunk_size=chunk_size, backend="torch")
    s_f, i_f = knn(q, g, k, exclude_self=exclude_self, chunk_size=chunk_size, backend="faiss")
    np.testing.assert_allclose(s_f, s_t, atol=1e-5)
    ref_s, ref_i = _brute(q, g, k, exclude_self=exclude_self)
    _assert_same_neighbours(q, g, s_f, i_f, ref_s, ref_i, exclude_self=exclude_self)
    # indices agree where scores are distinct (gap to both neighbours in the ranking)
    d = np.diff(s_t, axis=1)
    distinct = np.ones_like(s_t, dtype=bool)
    distinct[:, 1:] &= -d > TIE_GAP
    distinct[:, :-1] &= -d > TIE_GAP
    np.testing.assert_array_equal(i_f[distinct], i_t[distinct])


def test_torch_inputs_and_auto_backend():
    rng = np.random.default_rng(5)
    q, g = _normed(rng, 20, 8), _normed(rng, 50, 8)
    s_np, i_np = knn(q, g, 5)
    s_t, i_t = knn(torch.from_numpy(q), torch.from_numpy(g), 5, backend="auto")
    assert isinstance(s_t, np.ndarray) and isinstance(i_t, np.ndarray)
    np.testing.assert_array_equal(i_np, i_t)
    np.testing.assert_array_equal(s_np, s_t)
    # float64 input is accepted and cast to float32
    _s64, i64 = knn(q.astype(np.float64), g.astype(np.float64), 5)
    np.testing.assert_array_equal(i64, i_np)


def test_progress_callback():
    rng = np.random.default_rng(6)
    x = _normed(rng, 25, 4)
    calls = []
    knn(x, x, 3, exclude_self=True, chunk_size=10, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(10, 25), (20, 25), (25, 25)]


def test_auto_chunk_size_respects_budget():
    rows = auto_chunk_size(60_000, k=10, budget_bytes=256 * 2**20)
    assert rows * 60_000 * 4 <= 256 * 2**20
    assert rows > 100
    assert auto_chunk_size(10**9, k=1, budget_bytes=10) == 1


@pytest.mark.gpu
def test_cuda_tensors_stay_on_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rng = np.random.default_rng(7)
    q, g = _normed(rng, 30, 16), _normed(rng, 300, 16)
    s, i = knn(torch.from_numpy(q).cuda(), torch.from_numpy(g).cuda(), 6, chunk_size=7)
    _assert_same_neighbours(q, g, s, i, *_brute(q, g, 6))
    x = torch.from_numpy(g).cuda()
    s, i = knn(x, x, 6, exclude_self=True)
    _assert_same_neighbours(g, g, s, i, *_brute(g, g, 6, exclude_self=True), exclude_self=True)


class TestValidation:
    def setup_method(self):
        rng = np.random.default_rng(8)
        self.q = _normed(rng, 5, 8)
        self.g = _normed(rng, 10, 8)

    def test_dim_mismatch(self):
        with pytest.raises(ConfigError, match="dimension 4.*gallery has 8"):
            knn(self.q[:, :4], self.g, 3)

    @pytest.mark.parametrize("bad", [np.nan, np.inf])
    def test_nonfinite(self, bad):
        q = self.q.copy()
        q[2, 3] = bad
        with pytest.raises(ConfigError, match="NaN"):
            knn(q, self.g, 3)
        g = self.g.copy()
        g[0, 0] = bad
        with pytest.raises(ConfigError, match="gallery contains NaN"):
            knn(self.q, g, 3)

    @pytest.mark.parametrize("k", [0, -1, 2.5, True])
    def test_bad_k(self, k):
        with pytest.raises(ConfigError, match="k must be an integer >= 1"):
            knn(self.q, self.g, k)

    def test_k_too_large(self):
        _s, i = knn(self.q, self.g, 10)  # k == N is fine
        assert i.shape == (5, 10)
        with pytest.raises(ConfigError, match="k=11 but there are only 10 gallery items"):
            knn(self.q, self.g, 11)
        with pytest.raises(ConfigError, match="k=10 but there are only 9 gallery items other than"):
            knn(self.g, self.g, 10, exclude_self=True)

    def test_exclude_self_needs_same_set(self):
        with pytest.raises(ConfigError, match="exclude_self=True needs the queries to be the gallery"):
            knn(self.q, self.g, 2, exclude_self=True)

    def test_shapes_and_dtypes(self):
        with pytest.raises(ConfigError, match=r"shape \[N, D\]"):
            knn(self.q[0], self.g, 2)
        with pytest.raises(ConfigError, match="floating-point"):
            knn(self.q.astype(np.int32), self.g, 2)
        with pytest.raises(ConfigError, match="floating-point"):
            knn(torch.ones(3, 8, dtype=torch.int64), self.g, 2)
        with pytest.raises(ConfigError, match="numpy array or a torch tensor"):
            knn(self.q.tolist(), self.g, 2)
        with pytest.raises(ConfigError, match="empty"):
            knn(self.q[:0], self.g, 2)

    def test_bad_backend_and_chunk(self):
        with pytest.raises(ConfigError, match="unknown kNN backend"):
            knn(self.q, self.g, 2, backend="annoy")
        with pytest.raises(ConfigError, match="chunk_size"):
            knn(self.q, self.g, 2, chunk_size=0)
