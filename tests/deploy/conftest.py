"""Fixtures for the deploy tests: an untrained (seeded) Omniglot-sized model and galleries of real Omniglot drawings
(the sample shipped in the package; run folders come from tests/export_helpers.make_run, shared with the export tests).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from export_helpers import make_run

N_CLASSES = 12  # Omniglot evaluation classes written out as a class-per-folder gallery (20 images each)


@pytest.fixture(scope="session")
def omniglot_eval(omniglot_dir):
    from ctxsim.data.omniglot import omniglot

    return omniglot(omniglot_dir, "evaluation")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, omniglot_dir) -> Path:
    return make_run(tmp_path_factory.mktemp("run"), "convnet", omniglot_dir, seed=0)


@pytest.fixture(scope="session")
def other_run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("other_run"), "convnet", seed=1)


def write_classes(dataset, classes: range, root: Path) -> Path:
    """Write the images of ``classes`` (label ids) as root/<Alphabet__characterNN>/<n>.png; returns root."""
    import numpy as np

    labels = np.asarray(dataset.labels)
    for c in classes:
        name = dataset.class_names[c].replace("/", "__")
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c):
            dataset.load_image(int(i)).save(root / name / f"{int(i)}.png")
    return root


@pytest.fixture(scope="session")
def gallery_dir(tmp_path_factory, omniglot_eval) -> Path:
    """N_CLASSES Omniglot evaluation characters, 20 drawings each, as a class-per-folder tree."""
    return write_classes(omniglot_eval, range(N_CLASSES), tmp_path_factory.mktemp("gallery"))


@pytest.fixture(scope="session")
def extra_dir(tmp_path_factory, omniglot_eval) -> Path:
    """Two more characters (not in gallery_dir), for incremental adds."""
    return write_classes(omniglot_eval, range(N_CLASSES, N_CLASSES + 2), tmp_path_factory.mktemp("extra"))


@pytest.fixture(scope="session")
def flat_index(tmp_path_factory, gallery_dir, run_dir) -> Path:
    """A flat index over gallery_dir (read-only for tests: copy it before changing it)."""
    from ctxsim.deploy import build_index

    out = tmp_path_factory.mktemp("flat_index")
    build_index(gallery_dir, run_dir, out, "flat")
    return out
