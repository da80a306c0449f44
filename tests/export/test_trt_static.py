"""TensorRT 10/11 compatibility without TensorRT: the support data (onnx-tensorrt's operator matrix, the APIs
TensorRT 11 removed) and the checks built on it, on real exported models and on planted ones."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ctxsim.errors import ArtifactError, ConfigError
from ctxsim.export.trt_compat import check_onnx_for_tensorrt, load_support, onnx_problems, removed_api_uses

from export_helpers import make_run

REPO = Path(__file__).resolve().parents[2]
MAJORS = (10, 11)


# ---------------------------------------------------------------------------------------------- the data
def test_support_data_names_its_sources_for_both_majors():
    support = load_support()
    for major in ("10", "11"):
        matrix = support["onnx_operators"][major]
        assert matrix["source"].startswith("https://") and matrix["version"], major
        for op in ("Conv", "DequantizeLinear", "QuantizeLinear"):
            assert matrix["ops"][op]["types"], (major, op)
        dq = matrix["ops"]["DequantizeLinear"]
        assert "INT8" in dq["types"] and "INT32" not in dq["types"]
        assert "zero" in dq["notes"]
        assert "FP32" in matrix["ops"]["QuantizeLinear"]["types"]
    removed = support["removed_in_11"]
    assert removed["source"].startswith("https://docs.nvidia.com/") and removed["version"].startswith("11.")
    assert removed["names"]["BuilderFlag.FP16"] and removed["names"]["IBuilderConfig.int8_calibrator"]


def test_support_data_is_package_data():
    text = (REPO / "pyproject.toml").read_text()
    table = re.search(r"^\[tool\.setuptools\.package-data\]\n(.*?)(?:^\[|\Z)", text, re.M | re.S)
    assert table and re.search(r'^"ctxsim\.export" = \[[^]]*"\*\.json"', table.group(1), re.M)
    assert (REPO / "export" / "tensorrt_support.json").is_file()


# ---------------------------------------------------------------------------------------------- removed APIs
def test_engine_builder_uses_no_api_removed_in_11():
    assert removed_api_uses((REPO / "export" / "tensorrt.py").read_text()) == []


@pytest.mark.parametrize("snippet,api", [
    ("config.set_flag(trt.BuilderFlag.FP16)", "BuilderFlag.FP16"),
    ("config.int8_calibrator = c", "IBuilderConfig.int8_calibrator"),
    ("class C(trt.IInt8EntropyCalibrator2):\n    pass", "IInt8EntropyCalibrator2"),
    ("n = engine.device_memory_size", "ICudaEngine.device_memory_size"),
    ("config.set_calibration_profile(profile)", "IBuilderConfig.set_calibration_profile"),
    ("from tensorrt import IAlgorithmSelector", "IAlgorithmSelector"),
])
def test_removed_api_is_found_with_its_line(snippet, api):
    assert removed_api_uses("import tensorrt as trt\n" + snippet + "\n") == [f"line 2: {api}"]


def test_replacements_and_lookalikes_are_not_flagged():
    source = ("import tensorrt as trt\n"
              "n = engine.device_memory_size_v2\n"
              "m = engine.get_device_memory_size_for_profile_v2(0)\n"
              "flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)\n"
              "config.set_flag(trt.BuilderFlag.GPU_FALLBACK)\n"
              "dtype = trt.int8\n"
              "FP16 = 'fp16'  # trt.BuilderFlag.FP16 in a comment\n")
    assert removed_api_uses(source) == []


# ---------------------------------------------------------------------------------------------- real exports
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (model.onnx, model.fp16.onnx) of a random-weight run (do not modify)."""
    from ctxsim.export import export_onnx

    base = tmp_path_factory.mktemp("trt_static")
    out = {}
    for family in ("convnet", "mobilenet_v3_small", "resnet18"):
        result = export_onnx(make_run(base / f"run_{family}", family), base / f"out_{family}", fp16=True)
        out[family] = (result.onnx_path, result.fp16_path)
    return out


@pytest.mark.parametrize("family", ["convnet", "mobilenet_v3_small", "resnet18"])
@pytest.mark.parametrize("major", MAJORS)
def test_exported_models_fit_the_matrix(exported, family, major):
    fp32, fp16 = exported[family]
    assert onnx_problems(fp32, major) == []
    assert onnx_problems(fp16, major) == []
    assert any(n.op_type == "Cast" for n in onnx.load(str(fp16)).graph.node)  # really the typed fp16 graph
    check_onnx_for_tensorrt(fp16, majors=(major,))


@pytest.mark.parametrize("major", MAJORS)
def test_uint8_and_int8_files_fit_the_matrix(tmp_path, major):
    """The uint8 NHWC graph (UINT8 only as the network input: the cast comes before the transpose) and the int8
    Q/DQ file (INT8 DequantizeLinear inputs, zero points 0, float biases) are files TensorRT parses."""
    from ctxsim.export import export_onnx, quantize_onnx

    run = make_run(tmp_path / "run", "convnet")
    u8 = export_onnx(run, tmp_path / "u8", fp16=True, input_format="uint8_nhwc")
    assert onnx_problems(u8.onnx_path, major) == [] and onnx_problems(u8.fp16_path, major) == []
    fp32 = export_onnx(run, tmp_path / "f32")
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((8, 1, 28, 28)).astype(np.float32) for _ in range(4)]
    int8 = quantize_onnx(fp32.onnx_path, batches, out_path=tmp_path / "model.int8.onnx")
    assert onnx_problems(int8, major) == []


# ---------------------------------------------------------------------------------------------- planted graphs
def _model(nodes, inputs, outputs, initializers=(), domains=()):
    graph = helper.make_graph(nodes, "planted", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets)


def _float_io(name="x", shape=(1, 4)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _dequantize(x_type, x_values, zero_point):
    x = numpy_helper.from_array(np.asarray(x_values, dtype=x_type), "q")
    scale = numpy_helper.from_array(np.asarray(0.1, dtype=np.float32), "scale")
    zp = numpy_helper.from_array(np.asarray(zero_point, dtype=x_type), "zp")
    node = helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dq")
    return _model([node], [], [_float_io("y", (4,))], [x, scale, zp])


def test_op_not_in_the_matrix_is_named():
    nodes = [helper.make_node("FrobnicateLinear", ["x"], ["y"], name="made_up")]
    problems = onnx_problems(_model(nodes, [_float_io()], [_float_io("y")]), 10)
    assert len(problems) == 1 and "'made_up'" in problems[0] and "FrobnicateLinear" in problems[0]
    assert "not in onnx-tensorrt's operator matrix" in problems[0]


def test_op_listed_unsupported_is_named():
    nodes = [helper.make_node("Det", ["x"], ["y"], name="det")]
    model = _model(nodes, [_float_io("x", (2, 3, 3))], [_float_io("y", (2,))])
    for major in MAJORS:
        assert onnx_problems(model, major) == [f"node 'det' (Det): listed as unsupported by TensorRT {major}"]


def test_custom_domain_op_is_named():
    nodes = [helper.make_node("FusedGemm", ["x"], ["y"], name="ms", domain="com.microsoft")]
    problems = onnx_problems(_model(nodes, [_float_io()], [_float_io("y")], domains=["com.microsoft"]), 11)
    assert problems and "com.microsoft::FusedGemm" in problems[0]


def test_dequantize_of_int32_is_named():
    """ONNX Runtime's default int32 bias: a DequantizeLinear TensorRT does not list (quantize.py avoids it)."""
    problems = onnx_problems(_dequantize(np.int32, [1, 2, 3, 4], 0), 10)
    assert len(problems) == 1
    assert "'dq'" in problems[0] and "DequantizeLinear" in problems[0] and "INT32" in problems[0]


def test_dequantize_with_nonzero_zero_point_is_named():
    problems = onnx_problems(_dequantize(np.int8, [1, 2, 3, 4], 3), 11)
    assert len(problems) == 1 and "x_zero_point" in problems[0] and "'dq'" in problems[0]
    assert onnx_problems(_dequantize(np.int8, [1, 2, 3, 4], 0), 11) == []


def test_quantize_must_be_symmetric_int8():
    scale = numpy_helper.from_array(np.asarray(0.1, dtype=np.float32), "scale")
    zero = numpy_helper.from_array(np.asarray(0, dtype=np.int8), "zp")
    out = helper.make_tensor_value_info("q", TensorProto.INT8, [1, 4])
    ok = _model([helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="qi8")],
                [_float_io()], [out], [scale, zero])
    assert onnx_problems(ok, 10) == []
    u8 = _model([helper.make_node("QuantizeLinear", ["x", "scale"], ["q"], name="qu8")],  # ONNX default: uint8
                [_float_io()], [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 4])], [scale])
    problems = onnx_problems(u8, 10)
    assert len(problems) == 1 and "'qu8'" in problems[0] and "UINT8" in problems[0]


def test_shape_inputs_are_not_judged_but_data_inputs_are():
    shape = numpy_helper.from_array(np.asarray([4, 1], dtype=np.int64), "shape")
    reshape = _model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="r")],
                     [_float_io()], [_float_io("y", (4, 1))], [shape])
    assert onnx_problems(reshape, 10) == []  # the INT64 shape input is fine
    u8 = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 2, 2, 3])
    transpose = _model([helper.make_node("Transpose", ["x"], ["y"], name="t", perm=[0, 3, 1, 2])],
                       [u8], [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 3, 2, 2])])
    problems = onnx_problems(transpose, 10)
    assert len(problems) == 1 and "Transpose" in problems[0] and "UINT8" in problems[0]


def test_check_raises_one_line_naming_a_few_problems(tmp_path):
    nodes = [helper.make_node("FrobnicateLinear", ["x"], [f"y{i}"], name=f"n{i}") for i in range(5)]
    path = tmp_path / "bad.onnx"
    onnx.save(_model(nodes, [_float_io()], [_float_io(f"y{i}") for i in range(5)]), str(path))
    with pytest.raises(ArtifactError, match=r"bad\.onnx .*TensorRT 10: .*'n0'.*\(\+7 more\)") as e:
        check_onnx_for_tensorrt(path)
    assert "\n" not in str(e.value)


def test_unknown_major_and_missing_file_are_refused(tmp_path):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_float_io()], [_float_io("y")])
    with pytest.raises(ConfigError, match="TensorRT 9"):
        onnx_problems(model, 9)
    with pytest.raises(ArtifactError, match="not found"):
        onnx_problems(tmp_path / "absent.onnx", 10)
