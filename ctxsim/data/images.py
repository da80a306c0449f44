"""Reading images and image lists, for datasets and galleries alike: ``open_image`` (decoded as "L" or "RGB"),
``image_errors`` (any read or decode failure -> one-line DataError) and ``read_list_file`` (``path label ...`` lines).
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from ctxsim.data.limits import check_image_size
from ctxsim.errors import DataError, ImageRefused

__all__ = ["GREYSCALE_MODES", "as_l_or_rgb", "image_errors", "open_image", "read_list_file", "split_line",
           "strip_comment"]

#: Pillow modes that hold one grey channel (with alpha, or more bits): converted to "L", everything else to "RGB"
GREYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def as_l_or_rgb(im: Image.Image) -> Image.Image:
    """``im`` itself when it is "L" or "RGB", else converted: greyscale modes to "L", the rest to "RGB"."""
    if im.mode in ("L", "RGB"):
        return im
    return im.convert("L" if im.mode in GREYSCALE_MODES else "RGB")


def open_image(fp: Any, draft: int | None = None) -> Image.Image:
    """Open and fully decode an image from a path or file object, as "L" or "RGB" (:func:`as_l_or_rgb`); with
    ``draft``, a JPEG is decoded at the smallest 1/2 .. 1/8 scale still at least ``draft`` pixels a side.

    The size is checked from the header before decoding (``ctxsim.data.limits.check_image_size``: ImageRefused or
    ImageTooLarge). Otherwise raises whatever Pillow raises; wrap the call in :func:`image_errors`.
    """
    with Image.open(fp) as im:
        width, height = im.size
        check_image_size(width, height, name=str(fp) if isinstance(fp, (str, os.PathLike)) else None)
        if draft is not None:
            im.draft(None, (draft, draft))
        im.load()
        return im.copy() if im.mode in ("L", "RGB") else as_l_or_rgb(im)


@contextlib.contextmanager
def image_errors(name: str, hint: str = "") -> Iterator[None]:
    """Turn whatever reading or decoding image ``name`` raises into a one-line DataError naming it (ImageRefused
    and other DataErrors pass through, an ImageRefused naming the image); ``hint`` ends the message."""
    end = f"; {hint}" if hint else ""
    try:
        yield
    except ImageRefused as e:
        raise e.named(name) from None
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"image not found: {name}{end}") from e
    except IsADirectoryError as e:
        raise DataError(f"not an image file (a folder): {name}{end}") from e
    except Image.DecompressionBombError as e:
        raise DataError(f"image too large (decompression-bomb limit): {name}: {e}{end}") from e
    except Exception as e:  # any decode failure is a data problem (chained for debugging)
        raise DataError(f"cannot read image {name}: {type(e).__name__}: {e}{end}") from e


def strip_comment(line: str) -> str:
    """Drop a '#' comment: a whole line starting with '#', or from a '#' preceded by whitespace."""
    s = line.strip()
    if s.startswith("#"):
        return ""
    m = re.search(r"\s#", s)
    return s[: m.start()].strip() if m else s


def split_line(line: str) -> list[str]:
    """The fields of a list-file line: split on commas when it has one (so paths may hold spaces), else on
    whitespace."""
    if "," in line:
        return [p.strip() for p in line.split(",")]
    return line.split()


def read_list_file(path: str | os.PathLike, form: str, n_fields: tuple[int, int]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each line of a UTF-8 list file that is not blank or a comment (:func:`strip_comment`,
    :func:`split_line`). DataError when the file is missing or not UTF-8, or a line has an empty field or a number
    of fields outside ``n_fields`` (min, max); ``form`` (e.g. "path [label]") names the expected line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"list file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Notepad) is not part of the first path
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 list file of '{form}' lines") from None
    lines = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = strip_comment(raw)
        if not line:
            continue
        parts = split_line(line)
        if not n_fields[0] <= len(parts) <= n_fields[1] or not all(parts):
            raise DataError(f"{path}:{n}: expected '{form}', got {raw.strip()!r}")
        lines.append((n, parts))
    return lines
