"""Fixtures for the export tests (helpers live in export_helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from export_helpers import make_run


@pytest.fixture(scope="session")
def convnet_run(tmp_path_factory, omniglot_dir) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "omni", "convnet", omniglot_dir)


@pytest.fixture(scope="session")
def convnet_export(tmp_path_factory, convnet_run):
    """model.onnx + model.fp16.onnx of the convnet run (do not modify: shared by the session)."""
    from ctxsim.export import export_onnx

    return export_onnx(convnet_run, tmp_path_factory.mktemp("export") / "out", fp16=True)


@pytest.fixture(scope="session")
def omniglot_images(omniglot_dir):
    """40 real Omniglot evaluation images (PIL, mode L), 2 classes."""
    from ctxsim.data.omniglot import omniglot

    ds = omniglot(omniglot_dir, "evaluation")
    idx = [i for c in (0, 1) for i in ds.indices_of_class(c)]
    return [ds.load_image(i) for i in idx]
