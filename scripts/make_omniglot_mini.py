"""Regenerate ctxsim/data/omniglot_mini/omniglot_mini.npz (the shipped Omniglot sample) from the official zips.

    python scripts/make_omniglot_mini.py [ZIP_DIR] [--out ctxsim/data/omniglot_mini/omniglot_mini.npz] [--check]

ZIP_DIR holds images_background.zip and images_evaluation.zip (default: $CTXSIM_OMNIGLOT, else
../shared/data/omniglot beside the repository); ``--check`` regenerates into memory and exits 1 unless the result
equals ``--out`` byte for byte. Kept: every character and drawing of the ALPHABETS below, each 105x105 drawing
padded to 112x112 and reduced by exact 4x4 area averaging to 28x28 uint8 (``(255 * white + 8) // 16``, integer
arithmetic only). The ``.npz`` (``images`` and the member paths, no pickle) is written byte-reproducibly: fixed
member order, timestamps and attributes, DEFLATE level 9 (a zlib-ng build could differ; ``--check`` says so).
What was kept and why: ctxsim/data/omniglot_mini/README.md.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "ctxsim" / "data" / "omniglot_mini" / "omniglot_mini.npz"

# Chosen for variety of script families and a train set a 2-core CPU trains on in about a minute.
ALPHABETS: dict[str, tuple[str, ...]] = {
    "images_background": (
        "Armenian", "Bengali", "Braille", "Cyrillic", "Futurama", "Greek", "Hebrew", "Japanese_(katakana)",
        "Korean", "Latin",
    ),
    "images_evaluation": (
        "Atlantean", "Aurek-Besh", "Ge_ez", "Glagolitic", "Tengwar",
    ),
}
SIZE = 28
_PAD = (3, 4)  # white padding before/after on each axis: 105 + 7 = 112 = 4 x 28
_DATE = (1980, 1, 1, 0, 0, 0)


def natural_key(s: str) -> tuple:
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", s)))


def reduce_drawing(png: bytes) -> np.ndarray:
    """A 105x105 1-bit PNG -> 28x28 uint8 (white = 255), by white padding to 112 and exact 4x4 area averaging."""
    with Image.open(io.BytesIO(png)) as im:
        white = np.asarray(im.convert("1"), dtype=bool)  # True = white paper
    if white.shape != (105, 105):
        raise ValueError(f"expected a 105x105 drawing, got {white.shape[::-1]}")
    padded = np.pad(white, (_PAD, _PAD), constant_values=True).astype(np.int64)
    counts = padded.reshape(SIZE, 4, SIZE, 4).sum(axis=(1, 3))  # 0..16 white pixels per output pixel
    return ((255 * counts + 8) // 16).astype(np.uint8)


def collect(zip_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    images, members = [], []
    for split, alphabets in ALPHABETS.items():
        path = zip_dir / f"{split}.zip"
        if not path.is_file():
            raise SystemExit(f"{path} not found; pass the folder holding Omniglot's official zips")
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".png") and len(n.split("/")) == 4]
            for alphabet in alphabets:
                mine = sorted((n for n in names if n.split("/")[:2] == [split, alphabet]),
                              key=lambda n: [natural_key(p) for p in n.split("/")])
                if not mine:
                    raise SystemExit(f"no drawings of {alphabet} in {path}")
                for n in mine:
                    images.append(reduce_drawing(z.read(n)))
                    members.append(n)
    return np.stack(images), np.array([m.encode("ascii") for m in members])


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def pack(images: np.ndarray, members: np.ndarray) -> bytes:
    """The .npz bytes, reproducibly: fixed member order, timestamps, attributes and compression level."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, array in (("images.npy", images), ("members.npy", members)):
            info = zipfile.ZipInfo(name, date_time=_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            z.writestr(info, _npy(array), compresslevel=9)
    return out.getvalue()


def build(zip_dir: Path) -> bytes:
    return pack(*collect(zip_dir))


def default_zip_dir() -> Path:
    env = os.environ.get("CTXSIM_OMNIGLOT")
    return Path(env) if env else REPO.parent / "shared" / "data" / "omniglot"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zip_dir", nargs="?", type=Path, default=None, help="folder holding the official zips")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = ap.parse_args(argv)
    data = build(args.zip_dir or default_zip_dir())
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == data
        print(f"{args.out}: {'identical' if same else 'DIFFERS from a fresh build'} ({len(data):,} bytes)")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(data):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
