"""Fixtures for the export tests (helpers live in tests/export_helpers.py, shared with the deploy tests)."""
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
    """40 real Omniglot evaluation drawings from the shipped sample (PIL, mode L, 28x28), 2 classes."""
    from ctxsim.data.omniglot import omniglot

    ds = omniglot(omniglot_dir, "evaluation")
    idx = [i for c in (0, 1) for i in ds.indices_of_class(c)]
    return [ds.load_image(i) for i in idx]


@pytest.fixture(scope="session")
def large_drawings(fake_omniglot):
    """20 generated 105x105 drawings (PIL, mode L), where a preprocessing test needs a real resize."""
    from ctxsim.data.omniglot import omniglot

    ds = omniglot(fake_omniglot, "evaluation")
    return [ds.load_image(i) for i in range(20)]
