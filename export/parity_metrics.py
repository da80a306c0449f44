"""Parity measures: pure numbers comparing two embeddings (reference, artifact) of the same labelled items.

API: ``embedding_agreement`` (per-image cosine, norm errors), ``retrieval_agreement`` (Recall@K / MAP@R of both
and their deltas, k-NN Jaccard, R@1 flips with near-ties, cross-model R@1), and their parts ``cosine_rows``,
``topk_jaccard``, ``cross_recall_at_1``, ``r1_margins``, ``r1_flips``, ``flip_examples``. What they mean and
how parity judges them: docs/EXPORT.md, "Parity"; thresholds and reports: ``ctxsim.export.parity``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["cosine_rows", "cross_recall_at_1", "embedding_agreement", "flip_examples", "r1_flips", "r1_margins",
           "retrieval_agreement", "topk_jaccard"]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two [N, D] arrays (float64)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return num / np.maximum(den, 1e-30)


def topk_jaccard(a_idx: np.ndarray, b_idx: np.ndarray) -> np.ndarray:
    """Per-row Jaccard overlap of two [N, k] neighbour index sets."""
    k = a_idx.shape[1]
    inter = (a_idx[:, :, None] == b_idx[:, None, :]).any(axis=2).sum(axis=1)
    return inter / (2 * k - inter)


def cross_recall_at_1(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> float:
    """R@1 of ``queries[i]`` against ``gallery`` without item i (leave-one-out across two embeddings of the
    same items); queries whose class has no other item are skipped, as in ``retrieval_metrics``."""
    from ctxsim.knn import knn

    _, idx = knn(queries, gallery, 1, exclude_self=True)
    counts = np.bincount(labels)
    valid = counts[labels] > 1
    if not valid.any():
        return float("nan")
    return float((labels[idx[:, 0]] == labels)[valid].mean())


def r1_margins(embeddings: np.ndarray, labels: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Leave-one-out R@1 decision margin of every item: its best same-class similarity minus its best
    other-class similarity (> 0: the top-1 neighbour is of its class). +inf where no other class exists,
    NaN where its class has no other item (such queries do not count in R@1)."""
    import torch

    labels = np.asarray(labels, dtype=np.int64)
    emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    lab = torch.from_numpy(labels)
    out = np.empty(len(lab), dtype=np.float64)
    for start in range(0, len(lab), chunk):
        stop = min(start + chunk, len(lab))
        sims = (emb[start:stop] @ emb.T).double()
        same = lab[start:stop, None] == lab[None, :]
        rows = torch.arange(stop - start)
        sims[rows, rows + start] = float("-inf")  # the query itself (same class, so out of best_other too)
        best_same = sims.masked_fill(~same, float("-inf")).amax(1)
        best_other = sims.masked_fill(same, float("-inf")).amax(1)
        out[start:stop] = (best_same - best_other).numpy()
    out[np.bincount(labels)[labels] < 2] = np.nan
    return out


def r1_flips(margins_ref: np.ndarray, margins_art: np.ndarray, tie_margin: float) -> dict[str, float]:
    """Queries whose top-1 verdict differs between two embeddings of the same items, and ΔR@1 (points, over all
    valid queries) counting only the queries the reference decides by at least ``tie_margin``."""
    valid = ~np.isnan(margins_ref)
    hit_ref, hit_art = margins_ref > 0, margins_art > 0
    flipped = valid & (hit_ref != hit_art)
    near = valid & (np.abs(margins_ref) < tie_margin)
    gain = hit_art.astype(np.int64) - hit_ref.astype(np.int64)
    n = max(int(valid.sum()), 1)
    return {"tie_margin": float(tie_margin), "near_tied": int(near.sum()), "flips": int(flipped.sum()),
            "flips_near_tied": int((flipped & near).sum()),
            "delta_R@1_points": 100.0 * float(gain[valid & ~near].sum()) / n}


def flip_examples(ref: np.ndarray, art: np.ndarray, labels: np.ndarray, margins_ref: np.ndarray,
                  margins_art: np.ndarray, tie_margin: float, most: int = 32) -> list[dict[str, Any]]:
    """The flipped queries (at most ``most``, decisive ones first, then by falling reference margin), each with
    its top-1 neighbour under both models: ``{"query", "label", "reference_top1", "reference_score",
    "reference_hit", "artifact_top1", "artifact_score", "artifact_hit", "margin", "near_tie"}`` (indices into the
    evaluation split; a hit: the top-1 is of the query's class)."""
    valid = ~np.isnan(margins_ref)
    flipped = np.flatnonzero(valid & ((margins_ref > 0) != (margins_art > 0)))
    rows = flipped[np.argsort(-np.abs(margins_ref[flipped]), kind="stable")][:most]
    if not len(rows):
        return []
    tops = []
    for emb in (ref, art):
        sims = emb[rows].astype(np.float64) @ emb.T.astype(np.float64)
        sims[np.arange(len(rows)), rows] = -np.inf
        j = sims.argmax(1)
        tops.append((j, sims[np.arange(len(rows)), j]))
    (j_ref, s_ref), (j_art, s_art) = tops
    out = []
    for n, q in enumerate(rows):
        out.append({"query": int(q), "label": int(labels[q]),
                    "reference_top1": int(j_ref[n]), "reference_score": float(s_ref[n]),
                    "reference_hit": bool(labels[j_ref[n]] == labels[q]),
                    "artifact_top1": int(j_art[n]), "artifact_score": float(s_art[n]),
                    "artifact_hit": bool(labels[j_art[n]] == labels[q]),
                    "margin": float(margins_ref[q]), "near_tie": bool(abs(margins_ref[q]) < tie_margin)})
    return out


def embedding_agreement(ref: np.ndarray, art: np.ndarray) -> dict[str, float]:
    """Per-image cosine of ``art`` against ``ref`` (min, p1, p50, mean; -1 for a non-finite artifact embedding)
    and the largest |norm - 1| of each side's embeddings (NaN when no artifact embedding is finite)."""
    finite = np.isfinite(art).all(axis=1)
    cos = np.where(finite, cosine_rows(ref, art), -1.0)
    norms_art = np.linalg.norm(art.astype(np.float64), axis=1)
    norms_ref = np.linalg.norm(ref.astype(np.float64), axis=1)
    return {
        "cosine_min": float(cos.min()), "cosine_p1": float(np.percentile(cos, 1)),
        "cosine_p50": float(np.percentile(cos, 50)), "cosine_mean": float(cos.mean()),
        "norm_max_error": float(np.nanmax(np.abs(norms_art - 1.0))) if finite.any() else float("nan"),
        "norm_max_error_reference": float(np.abs(norms_ref - 1.0).max()),
    }


def retrieval_agreement(ref: np.ndarray, art: np.ndarray, labels: np.ndarray, ks: tuple[int, ...], k: int,
                        tie_margin: float) -> tuple[dict[str, dict[str, Any]], dict[str, float], dict[str, float]]:
    """(retrieval, neighbours, cross) of two embeddings of the same items, leave-one-out.

    retrieval: ``{"reference", "artifact", "delta_points", "ties"}`` (``retrieval_metrics`` of each at ``ks``,
    their differences in points, and :func:`r1_flips` with its ``"examples"``); neighbours: ``{"k",
    "jaccard_mean"}`` of the top-``k`` sets; cross: artifact queries against the reference gallery, ``{"R@1",
    "delta_R@1_points"}``. Where an artifact embedding is not finite, only the reference's metrics."""
    from ctxsim.evaluate import retrieval_metrics
    from ctxsim.knn import knn

    m_ref = retrieval_metrics(ref, labels, ks=ks)
    retrieval: dict[str, dict[str, Any]] = {"reference": m_ref, "artifact": {}, "delta_points": {}}
    if not np.isfinite(art).all():
        return retrieval, {}, {}
    m_art = retrieval_metrics(art, labels, ks=ks)
    retrieval["artifact"] = m_art
    retrieval["delta_points"] = {key: 100.0 * (m_art[key] - m_ref[key]) for key in m_ref}
    k_eff = min(int(k), len(labels) - 1)
    _, i_ref = knn(ref, ref, k_eff, exclude_self=True)
    _, i_art = knn(art, art, k_eff, exclude_self=True)
    neighbours = {"k": k_eff, "jaccard_mean": float(topk_jaccard(i_ref, i_art).mean())}
    margins_ref, margins_art = r1_margins(ref, labels), r1_margins(art, labels)
    retrieval["ties"] = r1_flips(margins_ref, margins_art, tie_margin)
    retrieval["ties"]["examples"] = flip_examples(ref, art, labels, margins_ref, margins_art, tie_margin)
    cross_r1 = cross_recall_at_1(art, ref, labels)
    cross = {"R@1": cross_r1, "delta_R@1_points": 100.0 * (cross_r1 - m_ref["R@1"])}
    return retrieval, neighbours, cross
