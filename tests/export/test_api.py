"""export_run end to end (ONNX + fp16 + parity + Triton + manifest) and its refusal without TensorRT."""
from __future__ import annotations

import importlib.util
import json

import pytest

from ctxsim.errors import MissingDependency
from ctxsim.export import export_run, read_manifest, verify_manifest
from ctxsim.io import sha256_file

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_export_run_writes_everything_bound_to_the_fingerprint(tmp_path, convnet_run):
    steps = []
    out = tmp_path / "export"
    result = export_run(convnet_run, out, fp16=True, triton=True, parity_limit=400,
                        progress=lambda d, t: steps.append((d, t)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert result.passed and set(result.parity) == {"model.onnx", "model.fp16.onnx"}
    names = {p.name for p in out.iterdir()}
    assert names == {"model.onnx", "model.fp16.onnx", "parity.json", "manifest.json", "triton"}

    m = read_manifest(out)
    assert m["fingerprint"] == result.fingerprint == m["contract"]["fingerprint"]
    assert m["contract"] == result.contract and m["embedding_dim"] == 64
    for name in ("model.onnx", "model.fp16.onnx"):
        assert m["artifacts"][name]["sha256"] == sha256_file(out / name) == result.sha256[name]
        assert m["parity"][name]["passed"] is True
        ties = dict(result.parity[name].retrieval["ties"])
        assert "examples" in ties
        assert m["parity"][name]["r1_flips"] == {k: v for k, v in ties.items() if k != "examples"}
    assert m["artifacts"]["model.fp16.onnx"]["precision"] == "fp16"
    assert m["triton"] == "triton"
    assert json.loads((out / "parity.json").read_text()).keys() == {"model.onnx", "model.fp16.onnx"}
    assert verify_manifest(out) == []

    (out / "model.fp16.onnx").write_bytes(b"tampered")
    assert verify_manifest(out) == ["model.fp16.onnx changed since export (sha256 differs)"]
    json.dumps(result.to_dict(), allow_nan=False)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_export_run_with_trt_but_no_tensorrt_fails_before_writing(tmp_path, convnet_run):
    with pytest.raises(MissingDependency, match=r"ctxsim\[trt\]"):
        export_run(convnet_run, tmp_path / "export", trt=True)
    assert not (tmp_path / "export").exists()
