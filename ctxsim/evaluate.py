"""Retrieval metrics (Recall@K, MAP@R, R-precision) as pure functions of embeddings and labels, chunked.

Definitions of Musgrave et al. ("A Metric Learning Reality Check", ECCV 2020), as pytorch-metric-learning's
``AccuracyCalculator``: queries are the gallery itself (leave-one-out) or a separate set; R = gallery items of the
query's label; queries with R = 0 are skipped by every metric (logged; DataError when all are). Recall@K: some
same-label item among the K nearest (R@1 = ``precision_at_1``); R-precision: same-label share of the first R;
MAP@R: (1/R) sum_{i<=R} P(i) rel(i). API: ``retrieval_metrics``. Queries are processed in chunks sorted by R, each
O(chunk x N) scores plus O(chunk x max(max(ks), R)) neighbours: never a Q x N matrix, nothing of size Q x k kept.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from ctxsim.errors import ConfigError, DataError
from ctxsim.knn import DEFAULT_CHUNK_BYTES, ExactSearcher

__all__ = ["format_metrics", "retrieval_metrics"]

logger = logging.getLogger(__name__)

ArrayLike = Any  # np.ndarray | torch.Tensor | Sequence[int]

# Bytes per (query, neighbour) cell of the per-chunk metric work: top-k scores and indices, neighbour labels,
# masks, cumulative counts and float64 precisions.
_BYTES_PER_NEIGHBOUR = 48


def _as_labels(labels: ArrayLike, n: int, name: str) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"{name} must be one label per item (1-D), got shape {arr.shape}")
    if len(arr) != n:
        raise ConfigError(f"{name} has {len(arr)} entries but there are {n} embeddings; pass one label per item")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} contains NaN or infinite values")
    return arr


def _check_ks(ks: Iterable[int]) -> list[int]:
    try:
        ks_list = list(ks)
    except TypeError:
        raise ConfigError(f"ks must be a sequence of positive integers, got {ks!r}") from None
    if not ks_list or any(
        not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in ks_list
    ):
        raise ConfigError(f"ks must be a non-empty sequence of integers >= 1, got {ks!r}")
    return sorted({int(k) for k in ks_list})


def retrieval_metrics(
    embeddings: ArrayLike,
    labels: ArrayLike,
    ks: Iterable[int] = (1, 2, 4, 8),
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Recall@K for each K in ``ks``, MAP@R and R-precision of retrieving ``labels`` by inner product.

    Args:
        embeddings: [N, D] gallery embeddings (numpy or torch, CPU or CUDA), float32, L2-normalised.
        labels: N labels (any sortable values; usually ints 0..C-1).
        ks: the K of each Recall@K.
        query_embeddings, query_labels: an optional separate query set (both or neither). Without it every
            gallery item queries all the others (leave-one-out).
        chunk_size: at most this many queries per chunk (default: from a ~256 MiB budget); chunks whose
            largest R is big get fewer rows.
        backend: kNN backend, see ``ctxsim.knn`` (``"auto"`` = torch).
        progress: optional callback ``(queries_done, queries_total)`` after each chunk.

    Returns:
        ``{"R@1": ..., "R@2": ..., "MAP@R": ..., "R-precision": ...}``, floats in [0, 1], averaged over the
        queries that have at least one same-label gallery item (see the module docstring).
    """
    ks_sorted = _check_ks(ks)
    if (query_embeddings is None) != (query_labels is None):
        raise ConfigError("pass both query_embeddings and query_labels, or neither (leave-one-out)")
    if chunk_size is not None and (
        not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ConfigError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")

    searcher = ExactSearcher(embeddings, backend=backend)
    n = searcher.n
    g_labels = _as_labels(labels, n, "labels")
    loo = query_embeddings is None
    if loo:
        queries = searcher.gallery
        q_labels = g_labels
    else:
        queries = searcher.check_queries(query_embeddings, "query_embeddings")
        q_labels = _as_labels(query_labels, queries.shape[0], "query_labels")

    # Integer codes shared by gallery and queries, then R per query.
    try:
        _, codes = np.unique(np.concatenate([g_labels, q_labels]) if not loo else g_labels, return_inverse=True)
    except TypeError as exc:
        raise ConfigError(f"labels must be comparable values of one type (ints or strings): {exc}") from None
    codes = codes.reshape(-1).astype(np.int64)
    g_codes = codes[:n]
    q_codes = g_codes if loo else codes[n:]
    counts = np.bincount(g_codes, minlength=int(codes.max()) + 1)
    r_all = counts[q_codes] - (1 if loo else 0)

    valid = np.flatnonzero(r_all > 0)
    n_lone = len(q_codes) - len(valid)
    if len(valid) == 0:
        raise DataError(
            "no query has a same-label item in the gallery, so retrieval metrics are undefined; "
            "check that queries and gallery share classes and that classes have at least 2 items"
        )
    if n_lone:
        logger.warning("skipping %d of %d queries with no same-label item in the gallery", n_lone, len(q_codes))

    # Process queries in order of increasing R so that only the chunks holding big classes need a wide top-k.
    order = valid[np.argsort(r_all[valid], kind="stable")]
    r_sorted = r_all[order]
    available = n - (1 if loo else 0)
    max_k = ks_sorted[-1]

    res_device = searcher.device if searcher.backend == "torch" else torch.device("cpu")
    g_codes_t = torch.from_numpy(g_codes).to(res_device)
    budget = DEFAULT_CHUNK_BYTES
    base_rows = chunk_size if chunk_size is not None else max(1, budget // (4 * n + _BYTES_PER_NEIGHBOUR * max_k))

    def k_for(last: int) -> int:
        return int(min(available, max(max_k, int(r_sorted[last]))))

    hits = dict.fromkeys(ks_sorted, 0)
    ap_sum = 0.0
    rp_sum = 0.0
    total = len(order)
    pos = 0
    with torch.inference_mode():
        while pos < total:
            rows = min(int(base_rows), total - pos)
            k = k_for(pos + rows - 1)
            if rows > 1 and rows * _BYTES_PER_NEIGHBOUR * k > budget:
                rows = max(1, budget // (_BYTES_PER_NEIGHBOUR * k))  # k only shrinks with fewer rows
                k = k_for(pos + rows - 1)
            stop = pos + rows
            q_idx = torch.from_numpy(order[pos:stop]).to(queries.device)
            _, nn_idx = searcher.search(queries[q_idx], k, q_idx if loo else None)

            nn_idx = nn_idx.to(res_device)
            q_lab = torch.from_numpy(q_codes[order[pos:stop]]).to(res_device)
            r = torch.from_numpy(r_sorted[pos:stop]).to(res_device)
            same = g_codes_t[nn_idx] == q_lab[:, None]  # [rows, k] bool
            del nn_idx
            for kk in ks_sorted:
                hits[kk] += int(same[:, : min(kk, k)].any(dim=1).sum())
            rank = torch.arange(1, k + 1, device=res_device)
            rel = same & (rank[None, :] <= r[:, None])  # relevant hits within the first R neighbours
            r64 = r.to(torch.float64)
            rp_sum += float((rel.sum(dim=1).to(torch.float64) / r64).sum())
            cum = rel.cumsum(dim=1)
            prec = (cum * rel).to(torch.float64) / rank.to(torch.float64)  # P(i) * rel(i)
            ap_sum += float((prec.sum(dim=1) / r64).sum())
            del same, rel, cum, prec
            pos = stop
            if progress is not None:
                progress(pos, total)

    metrics: dict[str, float] = {f"R@{kk}": hits[kk] / total for kk in ks_sorted}
    metrics["MAP@R"] = ap_sum / total
    metrics["R-precision"] = rp_sum / total
    return metrics


def format_metrics(metrics: Mapping[str, float], digits: int = 3) -> str:
    """One line such as ``"R@1 0.612  R@2 0.701  MAP@R 0.345  R-precision 0.402"`` (Recall@K by K first)."""

    def sort_key(name: str) -> tuple[int, float, str]:
        if name.startswith("R@") and name[2:].isdigit():
            return (0, int(name[2:]), name)
        fixed = {"MAP@R": 1, "R-precision": 2}
        return (fixed.get(name, 3), 0, name)

    parts = []
    for name in sorted(metrics, key=sort_key):
        value = metrics[name]
        parts.append(f"{name} {value:.{digits}f}" if isinstance(value, (float, int)) else f"{name} {value}")
    return "  ".join(parts)
