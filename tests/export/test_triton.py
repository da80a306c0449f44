"""Triton model repository: config.pbtxt names, dims and dtypes match the ONNX model; the TensorRT entry."""
from __future__ import annotations

import json
import re

import onnx
import pytest

from ctxsim.errors import ConfigError
from ctxsim.export import export_onnx, parse_pbtxt, write_triton_repository
from ctxsim.export.tensorrt import engine_sidecar, sidecar_path

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                  onnx.TensorProto.UINT8: "TYPE_UINT8"}


def _io(path):
    proto = onnx.load(str(path))
    def desc(v):
        t = v.type.tensor_type
        return v.name, ONNX_TO_TRITON[t.elem_type], [d.dim_value for d in t.shape.dim[1:]]
    return [desc(v) for v in proto.graph.input], [desc(v) for v in proto.graph.output]


def _check_against_onnx(cfg: dict, onnx_path) -> None:
    inputs, outputs = _io(onnx_path)
    got_in = [(i["name"], i["data_type"], i["dims"]) for i in cfg["input"]]
    got_out = [(o["name"], o["data_type"], o["dims"]) for o in cfg["output"]]
    assert got_in == inputs and got_out == outputs


@pytest.mark.parametrize("input_format", ["float_nchw", "uint8_nhwc"])
def test_onnx_model_config_matches_the_model(tmp_path, convnet_run, input_format):
    result = export_onnx(convnet_run, tmp_path / "exp", input_format=input_format)
    repo = write_triton_repository(tmp_path / "triton", result.onnx_path, max_batch_size=32, instances=2)
    text = (repo / "ctxsim_onnx" / "config.pbtxt").read_text()
    assert re.search(r'^platform: "onnxruntime_onnx"$', text, re.M)
    assert re.search(r"^max_batch_size: 32$", text, re.M)
    cfg = parse_pbtxt(text)
    assert cfg["name"] == "ctxsim_onnx" and cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] == 32
    _check_against_onnx(cfg, result.onnx_path)
    want_dims = [1, 28, 28] if input_format == "float_nchw" else [28, 28, 1]
    assert cfg["input"][0]["dims"] == want_dims and cfg["output"][0]["dims"] == [64]
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [4, 8, 16, 32]
    assert cfg["instance_group"][0] == {"count": 2, "kind": "KIND_GPU"}
    assert (repo / "ctxsim_onnx" / "1" / "model.onnx").read_bytes() == result.onnx_path.read_bytes()
    assert not (repo / "ctxsim_trt").exists()


def test_tensorrt_entry_uses_the_engine(tmp_path, convnet_export):
    engine = tmp_path / "model.fp16.engine"
    engine.write_bytes(b"not really an engine")
    profile = {"min": [1, 1, 28, 28], "opt": [16, 1, 28, 28], "max": [64, 1, 28, 28]}
    device = {"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0"}
    sidecar_path(engine).write_text(json.dumps(engine_sidecar(device, "fp16", profile, "0" * 64,
                                                              convnet_export.contract)))
    repo = write_triton_repository(tmp_path / "triton", convnet_export.onnx_path, engine, max_batch_size=64)
    cfg = parse_pbtxt((repo / "ctxsim_trt" / "config.pbtxt").read_text())
    assert cfg["platform"] == "tensorrt_plan" and cfg["name"] == "ctxsim_trt"
    _check_against_onnx(cfg, convnet_export.onnx_path)
    assert (repo / "ctxsim_trt" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    with pytest.raises(ConfigError, match="profile maximum 64"):
        write_triton_repository(tmp_path / "t2", convnet_export.onnx_path, engine, max_batch_size=128)


def test_parse_pbtxt_handles_comments_and_repeated_fields():
    cfg = parse_pbtxt('# c\nname: "m"  # trailing\ninput { name: "a" dims: [ 2, 3 ] }\n'
                      'input { name: "b", dims: [ -1 ] }\nflag: true\nx: 1.5\n')
    assert cfg == {"name": "m", "input": [{"name": "a", "dims": [2, 3]}, {"name": "b", "dims": [-1]}],
                   "flag": "true", "x": 1.5}
    with pytest.raises(ConfigError):
        parse_pbtxt("input { name: ")
    with pytest.raises(ConfigError, match="model name"):
        write_triton_repository("/tmp/x", "/tmp/y.onnx", name="bad name")
