"""Bounds on what reading one image may allocate: its pixel count (decoding) and its aspect ratio (resizing).

Decoding allocates width x height x channels bytes, and the eval transform's resize of the shorter side to R then
R x A*R pixels for aspect ratio A (a 565-byte PNG of 500000 x 1 would become 128,000,000 x 256). So every reader
checks the header's size before decoding (``check_image_size``, ``image_limits``) and refuses more than
``MAX_IMAGE_PIXELS`` pixels (:class:`ctxsim.errors.ImageTooLarge`, HTTP 413) or an aspect ratio over
``MAX_ASPECT_RATIO`` or an empty image (:class:`ctxsim.errors.ImageRefused`, 422). ``CTXSIM_MAX_IMAGE_PIXELS`` /
``CTXSIM_MAX_ASPECT_RATIO`` override the defaults (read at each check); ``ctxsim serve --max-pixels`` sets the
server's own. Pillow's decompression-bomb limit stays on as well. docs/RELIABILITY.md tells the story.
"""
from __future__ import annotations

import os

from ctxsim.errors import ConfigError, ImageRefused, ImageTooLarge

__all__ = ["ENV_MAX_ASPECT_RATIO", "ENV_MAX_PIXELS", "MAX_ASPECT_RATIO", "MAX_IMAGE_PIXELS", "check_image_size",
           "image_limits"]

#: Largest image decoded from a file or upload (64 MP: above a 50 MP camera, ~192 MB as RGB)
MAX_IMAGE_PIXELS = 64_000_000
#: Largest ratio of the longer to the shorter side (wider than any panorama a camera writes)
MAX_ASPECT_RATIO = 50.0
ENV_MAX_PIXELS = "CTXSIM_MAX_IMAGE_PIXELS"
ENV_MAX_ASPECT_RATIO = "CTXSIM_MAX_ASPECT_RATIO"


def _env_number(var: str, default: float, cast: type) -> float:
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return default
    try:
        value = cast(raw.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"{var} must be a number, got {raw!r}") from None
    if not value >= 1:
        raise ConfigError(f"{var} must be >= 1, got {raw!r}")
    return value


def image_limits(max_pixels: int | None = None, max_aspect_ratio: float | None = None) -> tuple[int, float]:
    """(max pixels, max aspect ratio): the arguments where given, else the environment overrides, else the defaults."""
    pixels = int(max_pixels) if max_pixels is not None else int(_env_number(ENV_MAX_PIXELS, MAX_IMAGE_PIXELS, int))
    aspect = (float(max_aspect_ratio) if max_aspect_ratio is not None
              else float(_env_number(ENV_MAX_ASPECT_RATIO, MAX_ASPECT_RATIO, float)))
    if pixels < 1 or not aspect >= 1:
        raise ConfigError(f"image limits must be >= 1, got max_pixels={pixels}, max_aspect_ratio={aspect}")
    return pixels, aspect


def check_image_size(width: int, height: int, name: str | None = None, *, max_pixels: int | None = None,
                     max_aspect_ratio: float | None = None, check_pixels: bool = True) -> None:
    """Refuse an image of ``width`` x ``height`` before it is decoded or resized (see the module docstring).

    ``check_pixels=False`` for an image already decoded (only its resize is still to be bounded).
    Raises ImageRefused (aspect ratio, empty image) or ImageTooLarge (pixels), naming ``name`` when given.
    """
    pixels, aspect = image_limits(max_pixels, max_aspect_ratio)
    w, h = int(width), int(height)
    if w < 1 or h < 1:
        raise ImageRefused(f"is {w}x{h}: it has no pixels", "min_side", 1, min(w, h), name)
    n = w * h
    if check_pixels and n > pixels:
        raise ImageTooLarge(f"is {w}x{h} = {n} pixels, over the limit of {pixels} (max_pixels; "
                            f"{ENV_MAX_PIXELS} or --max-pixels raises it)", "max_pixels", pixels, n, name)
    ratio = max(w, h) / min(w, h)
    if ratio > aspect:
        raise ImageRefused(f"is {w}x{h}, an aspect ratio of {ratio:.4g}:1, over the limit of {aspect:g}:1 "
                           f"(max_aspect_ratio; crop it, or set {ENV_MAX_ASPECT_RATIO})", "max_aspect_ratio",
                           aspect, ratio, name)
