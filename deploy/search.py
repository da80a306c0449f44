"""Search an index with query images, check an approximate index's recall, and draw result grids.

``search(index_dir, images, k)`` embeds the queries with the index's model (or ``model``; another model is
refused with FingerprintMismatch) and returns one :class:`QueryResult` per query with its ranked
:class:`Neighbor` s ``(rank, score, id, path, label)``. ``check_recall`` measures recall@k of the index against
exact search over the same stored embeddings. ``write_grid`` (from ``ctxsim.grid``, re-exported here) draws the
results as a PNG.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from ctxsim.deploy.embedder import open_index_model
from ctxsim.deploy.gallery import GalleryItem, load_image, load_images, open_gallery
from ctxsim.deploy.index import Index, load_index
from ctxsim.errors import DataError
from ctxsim.grid import GRID_BORDER, GRID_CAPTION, Neighbor, QueryResult, grid_size, write_grid

__all__ = ["GRID_BORDER", "GRID_CAPTION", "Neighbor", "QueryResult", "check_recall", "grid_size", "search",
           "search_embeddings", "write_grid"]


def _as_index(index: str | os.PathLike | Index) -> Index:
    return index if isinstance(index, Index) else load_index(index)


def _queries(images: Any) -> tuple[list[Any], list[str], list[str | None]]:
    """Query sources, display names and labels from a gallery path, a sequence of paths/PIL images, or one image."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (str, os.PathLike)):
        g = open_gallery(images)
        return [it.path for it in g.items], [it.path for it in g.items], [it.label for it in g.items]
    srcs: list[Any] = []
    names: list[str] = []
    labels: list[str | None] = []
    for i, x in enumerate(images):
        src: Any
        label: str | None
        if isinstance(x, GalleryItem):
            src, name, label = x.path, x.path, x.label
        elif isinstance(x, Image.Image):
            src, name, label = x, f"<image {i}>", None
        elif isinstance(x, (tuple, list)) and len(x) == 2:
            src, name, label = x[0], str(x[0]), None if x[1] is None else str(x[1])
        else:
            src, name, label = x, str(x), None
        srcs.append(src)
        names.append(name)
        labels.append(label)
    return srcs, names, labels


def search_embeddings(index: Index, embeddings: np.ndarray, k: int = 10) -> list[list[Neighbor]]:
    """Neighbours of already-embedded queries (the caller is responsible for using the index's model)."""
    scores, ids = index.search(embeddings, k)
    items = index.items
    out = []
    for s_row, i_row in zip(scores, ids):
        row = [Neighbor(r + 1, float(s), int(i), items[i].path, items[i].label)
               for r, (s, i) in enumerate(zip(s_row, i_row)) if i >= 0]
        out.append(row)
    return out


def search(index_dir: str | os.PathLike | Index, images: Any, k: int = 10, model: Any = None,
           batch_size: int = 64, skip_unreadable: bool = False,
           progress: Callable[[int, int], None] | None = None) -> list[QueryResult]:
    """Embed query images (paths, PIL images, or a gallery folder / list file) and return their top-``k``.

    The model defaults to the one recorded in index.json; a model with another fingerprint is refused.
    An unreadable query raises DataError, or is left out with ``skip_unreadable=True``.
    """
    index = _as_index(index_dir)
    try:
        return _search(index, images, k, model, batch_size, skip_unreadable, progress)
    finally:
        if index is not index_dir:  # opened here: a Milvus Lite file is released for other processes
            index.close()


def _search(index: Index, images: Any, k: int, model: Any, batch_size: int, skip_unreadable: bool,
            progress: Callable[[int, int], None] | None) -> list[QueryResult]:
    embedder = open_index_model(index.info, model, batch_size)
    srcs, names, labels = _queries(images)
    if not srcs:
        raise DataError("no query images given")
    if skip_unreadable:
        decoded, ok, _ = load_images(srcs)
    else:
        decoded, ok = [load_image(s) for s in srcs], list(range(len(srcs)))
    emb = embedder.embed(decoded, progress=progress)
    rows = search_embeddings(index, emb, k)
    return [QueryResult(names[i], row, labels[i], decoded[j]) for j, (i, row) in enumerate(zip(ok, rows))]


def check_recall(index_dir: str | os.PathLike | Index, k: int = 10, n_queries: int = 1000, seed: int = 0,
                 queries: np.ndarray | None = None) -> dict:
    """Recall@k of the index against exact search over the same stored embeddings.

    Queries: ``queries`` if given, else ``n_queries`` stored embeddings drawn at random (seeded). Recall@k is
    |approximate top-k  intersect  exact top-k| / k averaged over queries (1.0 for an exact index, up to ties).
    """
    index = _as_index(index_dir)
    try:
        return _check_recall(index, k, n_queries, seed, queries)
    finally:
        if index is not index_dir:
            index.close()


def _check_recall(index: Index, k: int, n_queries: int, seed: int, queries: np.ndarray | None) -> dict:
    emb = np.asarray(index.embeddings, np.float32)
    if queries is None:
        rng = np.random.default_rng(seed)
        sel = rng.choice(len(emb), size=min(n_queries, len(emb)), replace=False)
        queries = emb[np.sort(sel)]
    q = np.ascontiguousarray(np.asarray(queries, np.float32))
    kk = min(int(k), index.count)
    _, approx = index.search(q, kk)
    _, exact = index.exact_search(q, kk)
    hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx, exact)]
    return {"recall": float(np.mean(hits) / kk), "k": kk, "queries": len(q), "index_type": index.index_type,
            "count": index.count}
