"""Schemathesis hooks for tests/deploy/test_serve_schema.py (loaded through SCHEMATHESIS_HOOKS).

The upload fields are ``format: binary``: any bytes satisfy the schema, but only an image is accepted (415
otherwise), which JSON Schema cannot say. So schema-valid ("positive") uploads are drawn here as real images: PNG,
JPEG or BMP, greyscale or colour, 1 to 48 pixels a side (inside every decoding limit: aspect ratio <= 48). Invalid
("negative") data is still Schemathesis's own: wrong types, missing fields, out-of-range ``k``.
"""
from __future__ import annotations

import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _encode(args: tuple) -> bytes:
    w, h, mode, fmt, fill = args
    im = Image.new(mode, (w, h), fill if mode == "L" else (fill, 255 - fill, fill // 2))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


IMAGES = st.tuples(st.integers(1, 48), st.integers(1, 48), st.sampled_from(["L", "RGB"]),
                   st.sampled_from(["PNG", "JPEG", "BMP"]), st.integers(0, 255)).map(_encode)

schemathesis.openapi.format("binary", IMAGES)
