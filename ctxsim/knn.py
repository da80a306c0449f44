"""Exact k-nearest-neighbour search by inner product, chunked so that no full N x N matrix is ever built.

API: ``knn(queries, gallery, k)``, ``ExactSearcher`` (one gallery, searched block by block), ``auto_chunk_size``.
Backends: ``"torch"`` (``block @ gallery.T`` + ``torch.topk``, chunk rows from :data:`DEFAULT_CHUNK_BYTES`, CUDA
tensors stay on their device) and ``"faiss"`` (``IndexFlatIP``, on the CPU). ``"auto"`` is torch: always
installed, the same results on CPU and GPU, no slower than FAISS-CPU for exact search, and evaluation numbers
never depend on optional packages. Similarity is the plain inner product (cosine for the contracts' L2-normalised
embeddings, not checked); results are sorted by decreasing score, tied neighbours in an unspecified (but, for a
given backend, device and chunk size, deterministic) order. Approximate indexes: ``ctxsim.deploy.index``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ctxsim.errors import ConfigError, MissingDependency

__all__ = ["BACKENDS", "DEFAULT_CHUNK_BYTES", "ExactSearcher", "auto_chunk_size", "knn"]

#: Memory budget of one chunk of the query x gallery score matrix (and its top-k work space), in bytes.
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024
BACKENDS = ("auto", "torch", "faiss")

ArrayLike = Any  # np.ndarray | torch.Tensor


def auto_chunk_size(n_gallery: int, k: int = 1, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Number of query rows per chunk so that a chunk's scores ([rows, n_gallery] float32) plus its top-k
    results ([rows, k] float32 + int64) fit in ``budget_bytes``. Always at least 1."""
    per_row = 4 * max(int(n_gallery), 1) + 12 * max(int(k), 1)
    return max(1, int(budget_bytes) // per_row)


def _faiss():
    try:
        import faiss  # optional dependency, imported on demand
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a declared dependency
        raise MissingDependency(
            "backend='faiss' needs FAISS: pip install faiss-cpu (or ctxsim[gpu]), or use backend='torch'"
        ) from exc
    return faiss


def _as_embeddings(x: ArrayLike, name: str) -> torch.Tensor:
    """Validate a [N, D] floating array and return it as a float32 tensor (on its own device; no copy if
    it is already a contiguous float32 tensor / writable numpy array)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "f":
            raise ConfigError(f"{name} must be a floating-point array, got dtype {x.dtype}; pass float32 embeddings")
        arr = np.ascontiguousarray(x, dtype=np.float32)
        if not arr.flags.writeable:  # torch.from_numpy wants a writable buffer
            arr = arr.copy()
        t = torch.from_numpy(arr)
    else:
        raise ConfigError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if not t.is_floating_point():
        raise ConfigError(f"{name} must be a floating-point array, got dtype {t.dtype}; pass float32 embeddings")
    if t.dim() != 2:
        raise ConfigError(f"{name} must have shape [N, D], got shape {tuple(t.shape)}")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ConfigError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one embedding")
    t = t.to(torch.float32).contiguous()
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{name} contains NaN or infinite values; check the model output before searching")
    return t


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown kNN backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return "torch" if backend == "auto" else backend


class ExactSearcher:
    """Exact inner-product search over one gallery; ``search`` handles one block of queries.

    ``knn`` and ``ctxsim.evaluate`` drive it chunk by chunk. The gallery is validated once here.
    """

    def __init__(self, gallery: ArrayLike, backend: str = "auto") -> None:
        self.backend = _resolve_backend(backend)
        self.gallery = _as_embeddings(gallery, "gallery")
        self.n, self.dim = self.gallery.shape
        self.device = self.gallery.device
        self._index: Any = None  # the FAISS index of the faiss backend
        if self.backend == "faiss":
            faiss = _faiss()
            self._index = faiss.IndexFlatIP(self.dim)
            self._index.add(self.gallery.cpu().numpy())

    def check_queries(self, queries: ArrayLike, name: str = "queries") -> torch.Tensor:
        """Validate queries against the gallery (same dim) and put them on the gallery's device."""
        q = _as_embeddings(queries, name)
        if q.shape[1] != self.dim:
            raise ConfigError(
                f"{name} have dimension {q.shape[1]} but the gallery has {self.dim}; "
                "embed both with the same model"
            )
        return q.to(self.device)

    def search(
        self, queries: torch.Tensor, k: int, self_indices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` gallery items for one block of (already checked) queries.

        ``self_indices[i]`` (optional) is a gallery index that query ``i`` must not get back (its own entry).
        Returns (scores [B, k] float32, indices [B, k] int64) as tensors, sorted by decreasing score; on the
        gallery's device for the torch backend, on the CPU for FAISS. The caller keeps ``k`` within range.
        """
        if self.backend == "torch":
            scores = queries @ self.gallery.T
            if self_indices is not None:
                rows = torch.arange(scores.shape[0], device=scores.device)
                scores[rows, self_indices.to(scores.device)] = -math.inf
            top_s, top_i = torch.topk(scores, k, dim=1, largest=True, sorted=True)
            return top_s, top_i.to(torch.int64)

        q = queries.cpu().numpy()
        extra = 0 if self_indices is None else 1
        d, i = self._index.search(q, k + extra)
        d_t, i_t = torch.from_numpy(d), torch.from_numpy(i.astype(np.int64, copy=False))
        if self_indices is not None:
            # Drop each row's own index; a row whose own index fell outside the k+1 (only possible with
            # more than k+1 exact ties) drops its last column instead. Exactly one column goes per row.
            keep = i_t != self_indices.cpu().to(torch.int64)[:, None]
            no_self = keep.all(dim=1)
            keep[no_self, -1] = False
            d_t = d_t[keep].view(len(q), k)
            i_t = i_t[keep].view(len(q), k)
        return d_t, i_t


def knn(
    queries: ArrayLike,
    gallery: ArrayLike,
    k: int,
    exclude_self: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` gallery neighbours of each query by inner product, without an N x N matrix.

    Args:
        queries: [Q, D] embeddings (numpy array or torch tensor, CPU or CUDA; cast to float32).
        gallery: [N, D] embeddings of the same dimension.
        k: neighbours per query, 1 <= k <= N (N - 1 with ``exclude_self``).
        exclude_self: the queries *are* the gallery, in the same order; query ``i`` never gets item ``i``
            back (its score is set to -inf before the top-k), which is leave-one-out retrieval.
        chunk_size: query rows per chunk; default from a ~256 MiB budget for the [chunk, N] score block.
        backend: ``"auto"`` (= ``"torch"``, see the module docstring), ``"torch"`` or ``"faiss"``.
        progress: optional callback ``(queries_done, queries_total)`` after each chunk.

    Returns:
        (scores [Q, k] float32, indices [Q, k] int64) numpy arrays, each row sorted by decreasing score.
        The order of tied scores is backend-defined (see the module docstring).

    Raises:
        ConfigError: bad shapes, dtypes, NaN/inf values, mismatched dimensions, k out of range,
            an unknown backend or a non-positive chunk size.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
    searcher = ExactSearcher(gallery, backend=backend)
    q = searcher.gallery if exclude_self and queries is gallery else searcher.check_queries(queries)
    k = int(k)
    if exclude_self and q.shape[0] != searcher.n:
        raise ConfigError(
            f"exclude_self=True needs the queries to be the gallery (same items, same order), "
            f"but got {q.shape[0]} queries and {searcher.n} gallery items"
        )
    available = searcher.n - int(bool(exclude_self))
    if k > available:
        what = "gallery items other than the query itself" if exclude_self else "gallery items"
        raise ConfigError(f"k={k} but there are only {available} {what}; use k <= {available}")
    if chunk_size is None:
        chunk_size = auto_chunk_size(searcher.n, k)
    elif not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    chunk_size = int(chunk_size)

    n_q = q.shape[0]
    out_s = np.empty((n_q, k), dtype=np.float32)
    out_i = np.empty((n_q, k), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, n_q, chunk_size):
            stop = min(start + chunk_size, n_q)
            own = torch.arange(start, stop, device=q.device) if exclude_self else None
            s, i = searcher.search(q[start:stop], k, own)
            out_s[start:stop] = s.cpu().numpy()
            out_i[start:stop] = i.cpu().numpy()
            if progress is not None:
                progress(stop, n_q)
    return out_s, out_i
