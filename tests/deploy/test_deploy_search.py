"""Search with images, and the result grid."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ctxsim.deploy import grid_size, load_index, search, write_grid
from ctxsim.deploy.search import GRID_BORDER, GRID_CAPTION


def _query_folder(tmp_path, gallery_dir, n_classes=3):
    q = tmp_path / "queries"
    for cls in sorted(gallery_dir.iterdir())[:n_classes]:
        (q / cls.name).mkdir(parents=True)
        img = sorted(cls.iterdir())[0]
        (q / cls.name / img.name).write_bytes(img.read_bytes())
    return q


def test_search_returns_ranked_neighbours(tmp_path, flat_index, gallery_dir):
    q = _query_folder(tmp_path, gallery_dir)
    res = search(flat_index, q, k=7)
    assert len(res) == 3
    idx = load_index(flat_index)
    for r in res:
        assert r.label is not None and len(r.neighbors) == 7
        assert [n.rank for n in r.neighbors] == list(range(1, 8))
        scores = [n.score for n in r.neighbors]
        assert scores == sorted(scores, reverse=True)
        top = r.neighbors[0]  # the query image is in the gallery: it comes back first, same label
        assert top.score == pytest.approx(1.0, abs=1e-5) and top.label == r.label
        assert idx.items[top.id].path == top.path
        query, neighbours = r  # (query path, [(rank, score, id, path, label)])
        assert query == r.query and tuple(neighbours[0]) == tuple(top)
    pil = Image.open(res[0].query)
    again = search(idx, [pil], k=3)
    assert [n.id for n in again[0].neighbors] == [n.id for n in res[0].neighbors[:3]]


def test_grid_png_size_and_colours(tmp_path, flat_index, gallery_dir):
    q = _query_folder(tmp_path, gallery_dir)
    res = search(flat_index, q, k=5)
    thumb = 64
    out = tmp_path / "grid.png"
    w, h = write_grid(res, out, thumb=thumb)
    assert (w, h) == grid_size(3, 6, thumb)
    assert (w, h) == (6 * (thumb + 2 * GRID_BORDER), 3 * (thumb + 2 * GRID_BORDER + GRID_CAPTION))
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (w, h)
        px = np.asarray(im.convert("RGB"))
    cell_w, cell_h = thumb + 2 * GRID_BORDER, thumb + 2 * GRID_BORDER + GRID_CAPTION
    for r, row in enumerate(res):
        for c, n in enumerate(row.neighbors, start=1):
            frame = tuple(int(v) for v in px[r * cell_h + 1, c * cell_w + 1])
            assert frame == ((40, 170, 60) if n.label == row.label else (210, 40, 40))
