"""Shared fixtures: Omniglot-like data every checkout has, and the guard that no test skips for lack of data.

- ``omniglot_dir``: the data root of the Omniglot tests, the sample shipped in the package (``"omniglot-mini"``,
  a name, no path; 10 background + 5 evaluation alphabets, 28 px). Use it wherever real drawings matter.
- ``fake_omniglot``: a folder holding generated ``images_background.zip`` / ``images_evaluation.zip`` in the
  official layout (105x105 1-bit PNGs), for the zip reader where the content does not matter. Seeded: the same
  bytes in every process (no ``hash()``).
- ``omniglot_full``: the full official zips, from ``$CTXSIM_OMNIGLOT`` only; for ``slow`` tests (``.ci/run`` sets
  the variable where ../shared/data/omniglot exists). Without it those tests skip, and only ``-m slow`` runs them.

A test that skips because data is missing fails the run (see ``pytest_sessionfinish``): a fresh clone runs every
test except those marked for hardware or servers it lacks.
"""
from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_ENV = "CTXSIM_OMNIGLOT"

# A skip reason that blames missing data (not a missing GPU, package or server): never allowed in the default run.
DATA_SKIP = re.compile(r"(data ?set|\bdata\b|omniglot|\bzips?\b|images?)\b.*\b(not found|missing|absent|not present"
                       r"|unavailable|download)", re.IGNORECASE)
# Markers whose tests may skip for what the machine lacks (hardware, servers).
HARDWARE_MARKERS = ("gpu", "tensorrt", "slow")


@pytest.fixture(scope="session")
def omniglot_dir() -> str:
    """The shipped Omniglot sample's data root (a dataset name, not a path): real drawings, on every checkout."""
    from ctxsim.data.omniglot import MINI  # imported here: this file loads without torch (test_fresh_clone.py)

    return MINI


@pytest.fixture(scope="session")
def omniglot_full() -> Path:
    """The full official Omniglot zips from $CTXSIM_OMNIGLOT (slow tests only)."""
    root = os.environ.get(OMNIGLOT_ENV)
    if not root:
        pytest.skip(f"set {OMNIGLOT_ENV} to the folder of the official Omniglot zips (slow tests only)")
    path = Path(root)
    if not (path / "images_evaluation.zip").is_file() or not (path / "images_background.zip").is_file():
        pytest.fail(f"{OMNIGLOT_ENV}={root} does not hold images_background.zip and images_evaluation.zip")
    return path


FAKE_ALPHABETS = {"images_background": ("Latin", "Greek", "Futurama"), "images_evaluation": ("Atlantean", "Angelic")}
FAKE_CHARACTERS = 4  # per alphabet
FAKE_DRAWINGS = 5    # per character


def _fake_drawing(rng: np.random.Generator) -> bytes:
    """A 105x105 1-bit PNG: a few random black strokes on white, like an Omniglot drawing."""
    from PIL import Image, ImageDraw

    im = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 5))):
        pts = [tuple(int(v) for v in rng.integers(10, 95, 2)) for _ in range(int(rng.integers(2, 5)))]
        draw.line(pts, fill=0, width=3)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def make_fake_omniglot(root: Path, seed: int = 0) -> Path:
    """Write fake ``images_background.zip`` and ``images_evaluation.zip`` (official member layout) into ``root``.

    One generator seeded with ``seed`` draws every image in a fixed order, so the zips are the same everywhere.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, alphabets in FAKE_ALPHABETS.items():
        with zipfile.ZipFile(root / f"{split}.zip", "w") as z:
            for a in alphabets:
                for c in range(1, FAKE_CHARACTERS + 1):
                    for j in range(1, FAKE_DRAWINGS + 1):
                        z.writestr(f"{split}/{a}/character{c:02d}/{c:04d}_{j:02d}.png", _fake_drawing(rng))
    return root


@pytest.fixture(scope="session")
def fake_omniglot(tmp_path_factory) -> Path:
    """Generated Omniglot zips (3 background, 2 evaluation alphabets, 4 characters x 5 drawings each)."""
    return make_fake_omniglot(tmp_path_factory.mktemp("fake_omniglot"))


# ---------------------------------------------------------------------------------------- the no-data-skip guard
def is_data_skip(reason: str) -> bool:
    """True when a skip reason blames missing data (a data set, zips, images not found)."""
    return bool(DATA_SKIP.search(reason))


_DATA_SKIPS: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or "xfail" in report.keywords:
        return
    if any(m in report.keywords for m in HARDWARE_MARKERS):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if is_data_skip(reason):
        _DATA_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _DATA_SKIPS:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if _DATA_SKIPS:
        terminalreporter.section("skipped for missing data", sep="=", red=True)
        terminalreporter.write_line(f"{len(_DATA_SKIPS)} test(s) skipped for missing data; every test must run on a "
                                    "fresh clone (use the omniglot_dir or fake_omniglot fixture):", red=True)
        for line in _DATA_SKIPS[:20]:
            terminalreporter.write_line(f"  {line}", red=True)
