"""Shared fixtures: paths to the real data every developer and CI has."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    if not (OMNIGLOT / "images_evaluation.zip").exists():
        pytest.skip(f"Omniglot zips not found at {OMNIGLOT}")
    return OMNIGLOT
