"""The triton:// Embedder backend. The server test runs only where CTXSIM_TRITON_URL names a Triton server serving
a repository written by `ctxsim export --triton` (never run on the development machines); the rest runs anywhere."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ctxsim.deploy.embedder_triton import is_triton_url, parse_triton_url
from ctxsim.errors import ConfigError


def test_triton_urls():
    assert parse_triton_url("triton://gpu-1:8000/ctxsim_onnx") == ("gpu-1:8000", "ctxsim_onnx", "")
    assert parse_triton_url("triton:/gpu-1:8000/ctxsim_trt/2") == ("gpu-1:8000", "ctxsim_trt", "2")  # via a Path
    assert is_triton_url("triton://h:8000/m") and not is_triton_url("runs/omni")
    with pytest.raises(ConfigError, match="triton://host:port/NAME"):
        parse_triton_url("triton://h:8000")


def test_export_writes_the_contract_into_config_pbtxt(tmp_path, run_dir):
    """The repository's config carries the export contract (fingerprint, preprocessing) the embedder reads."""
    from ctxsim.export import export_onnx, parse_pbtxt, write_triton_repository
    from ctxsim.export.onnx_export import read_onnx_contract

    onnx = export_onnx(run_dir, tmp_path / "exp").onnx_path
    repo = write_triton_repository(tmp_path / "triton", onnx)
    cfg = parse_pbtxt((repo / "ctxsim_onnx" / "config.pbtxt").read_text())
    params = cfg["parameters"]
    assert params["key"] == "ctxsim_contract"
    contract = json.loads(params["value"]["string_value"])
    assert contract == json.loads(json.dumps(read_onnx_contract(onnx)))
    assert contract["fingerprint"]


@pytest.mark.triton
@pytest.mark.skipif(not os.environ.get("CTXSIM_TRITON_URL"),
                    reason="set CTXSIM_TRITON_URL=triton://host:8000/ctxsim_onnx and CTXSIM_TRITON_ONNX=<the same "
                           "model.onnx> to run against a Triton server")
def test_triton_embeddings_equal_onnx_runtime():
    from PIL import Image

    from ctxsim.deploy import Embedder

    remote = Embedder.from_artifact(os.environ["CTXSIM_TRITON_URL"])
    local = Embedder.from_artifact(os.environ["CTXSIM_TRITON_ONNX"])
    assert remote.fingerprint == local.fingerprint and remote.backend == "triton"
    rng = np.random.default_rng(0)
    mode = remote.preprocess_spec.channels
    shape = (40, 40) if mode == "L" else (40, 40, 3)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(5)]
    np.testing.assert_allclose(remote.embed(images), local.embed(images), atol=1e-4)


def test_without_tritonclient_one_line(monkeypatch):
    import sys

    from ctxsim.deploy import Embedder
    from ctxsim.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "tritonclient", None)
    monkeypatch.setitem(sys.modules, "tritonclient.http", None)
    with pytest.raises(MissingDependency, match=r"pip install 'tritonclient\[http\]'"):
        Embedder.from_artifact("triton://127.0.0.1:9/ctxsim_onnx")
