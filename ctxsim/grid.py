"""Result grids: one row per query, the query then its ranked neighbours, each framed green (same label as the
query), red (another) or grey (unknown), with the score underneath. The picture `ctxsim search --grid`, the demo
and `ctxsim parity --flips-grid` draw; it lives in the core so that every stage may draw it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, ImageDraw, ImageFont

from ctxsim.data.images import open_image
from ctxsim.errors import ConfigError
from ctxsim.io import atomic_path

__all__ = ["GRID_BORDER", "GRID_CAPTION", "Neighbor", "QueryResult", "grid_size", "write_grid"]


class Neighbor(NamedTuple):
    """One retrieved item."""

    rank: int
    score: float
    id: int
    path: str
    label: str | None


@dataclass
class QueryResult:
    """The neighbours of one query (``query`` is its path, or ``<image i>`` for an in-memory image)."""

    query: str
    neighbors: list[Neighbor]
    label: str | None = None
    image: Image.Image | None = field(default=None, repr=False, compare=False)

    def __iter__(self):  # (query, neighbors) unpacking
        return iter((self.query, self.neighbors))

    def to_dict(self) -> dict:
        return {"query": self.query, "label": self.label, "neighbors": [n._asdict() for n in self.neighbors]}


# ---------------------------------------------------------------------------------------------- grid
GRID_BORDER = 4     # coloured frame around each thumbnail, px
GRID_CAPTION = 14   # text line under each thumbnail, px
_GREEN, _RED, _GREY, _BLUE = (40, 170, 60), (210, 40, 40), (150, 150, 150), (60, 90, 200)


def grid_size(rows: int, cols: int, thumb: int = 96) -> tuple[int, int]:
    """(width, height) of a grid: each cell is (thumb + 2 * GRID_BORDER) wide, (thumb + 2 * GRID_BORDER +
    GRID_CAPTION) high; ``cols`` = 1 (the query) + the most neighbours of any row."""
    return cols * (thumb + 2 * GRID_BORDER), rows * (thumb + 2 * GRID_BORDER + GRID_CAPTION)


def _thumb(src: Any, thumb: int) -> Image.Image:
    try:
        im = (src if isinstance(src, Image.Image) else open_image(src)).convert("RGB")
    except Exception:  # noqa: BLE001 - a moved or unreadable file is drawn as a grey placeholder
        return Image.new("RGB", (thumb, thumb), (220, 220, 220))
    scale = thumb / max(im.width, im.height)  # small images (digits, Omniglot) are enlarged to fill the cell
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (thumb, thumb), (255, 255, 255))
    canvas.paste(im, ((thumb - im.width) // 2, (thumb - im.height) // 2))
    return canvas


def write_grid(results: Sequence[QueryResult], out_png: str | os.PathLike, thumb: int = 96) -> tuple[int, int]:
    """Draw ``results`` (one row per query) into a PNG of :func:`grid_size` pixels; returns (width, height)."""
    if not results:
        raise ConfigError("no results to draw")
    if thumb < 8:
        raise ConfigError(f"thumb must be >= 8 px, got {thumb}")
    cols = 1 + max(len(r.neighbors) for r in results)
    w, h = grid_size(len(results), cols, thumb)
    cell_w, cell_h = thumb + 2 * GRID_BORDER, thumb + 2 * GRID_BORDER + GRID_CAPTION
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for r, res in enumerate(results):
        y = r * cell_h
        cells = [(res.image if res.image is not None else res.query, _BLUE, "query")]
        for n in res.neighbors:
            colour = _GREY if res.label is None or n.label is None else (_GREEN if n.label == res.label else _RED)
            cells.append((n.path, colour, f"{n.score:.3f}"))
        for c, (src, colour, caption) in enumerate(cells):
            x = c * cell_w
            draw.rectangle([x, y, x + cell_w - 1, y + thumb + 2 * GRID_BORDER - 1], fill=colour)
            img.paste(_thumb(src, thumb), (x + GRID_BORDER, y + GRID_BORDER))
            draw.text((x + GRID_BORDER, y + thumb + 2 * GRID_BORDER + 1), caption, fill=(0, 0, 0), font=font)
    out = Path(out_png)
    with atomic_path(out) as tmp:
        img.save(tmp, format="PNG")
    return w, h
