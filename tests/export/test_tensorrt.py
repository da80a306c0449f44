"""TensorRT: the pure parts (version support, network flags, engine precision from the ONNX file, device
compatibility, sidecar, missing-TensorRT message) run everywhere; engine build/run tests are marked `tensorrt` and
skip unless TensorRT imports and CUDA is available. They build every precision through the one strongly typed
path, so the first machine with TensorRT 10 (a Jetson) or 11 (a server) runs that major's path whole."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ctxsim.errors import ArtifactError, ConfigError, MissingDependency
from ctxsim.export import build_engine, check_engine_compatible
from ctxsim.export.tensorrt import (
    SUPPORTED_MAJORS,
    TRT_HINT,
    engine_precision,
    engine_sidecar,
    network_flags,
    read_sidecar,
    sidecar_path,
    tensorrt_major,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
NEEDS_TRT = pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()),
                               reason="needs TensorRT and a CUDA GPU (neither is on the development machines)")

ORIN = {"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0.30"}


def test_matching_device_passes():
    check_engine_compatible(dict(ORIN), dict(ORIN))
    check_engine_compatible({**ORIN, "gpu_name": "orin "}, ORIN)  # case and spacing of the name do not matter
    check_engine_compatible({**ORIN, "tensorrt_version": "10.3.0.26"}, ORIN)  # same release, other build


@pytest.mark.parametrize("field,value,words", [
    ("gpu_name", "NVIDIA A100-SXM4-80GB", "GPU"),
    ("compute_capability", "8.0", "compute capability 8.0 vs 8.7"),
    ("tensorrt_version", "10.7.0.23", "TensorRT 10.7.0.23 vs 10.3.0.30"),
])
def test_mismatching_device_says_rebuild(field, value, words):
    with pytest.raises(ArtifactError, match="rebuild it on the target") as e:
        check_engine_compatible({**ORIN, field: value}, ORIN)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_sidecar_is_written_and_read(tmp_path, convnet_export):
    profile = {"min": [1, 1, 28, 28], "opt": [16, 1, 28, 28], "max": [64, 1, 28, 28]}
    sc = engine_sidecar(ORIN, "int8", profile, "ab" * 32, convnet_export.contract, 12.0, 2.0)
    assert sc["contract"]["precision"] == "int8" and sc["fingerprint"] == convnet_export.fingerprint
    assert convnet_export.contract["precision"] == "fp32"  # not modified in place
    engine = tmp_path / "model.int8.engine"
    engine.write_bytes(b"fake")
    with pytest.raises(ArtifactError, match="no sidecar"):
        read_sidecar(engine)
    import json

    sidecar_path(engine).write_text(json.dumps(sc))
    assert read_sidecar(engine)["profile"]["max"] == [64, 1, 28, 28]
    sidecar_path(engine).write_text(json.dumps({"precision": "int8"}))
    with pytest.raises(ArtifactError, match="lacks"):
        read_sidecar(engine)
    for key, value, words in (("profile", {"max": "64"}, "sidecar.profile.max must be a list of integers"),
                              ("compute_capability", 8.7, "sidecar.compute_capability must be a string"),
                              ("contract", None, "sidecar.contract must be a mapping, got None")):
        sidecar_path(engine).write_text(json.dumps({**sc, key: value}))
        with pytest.raises(ArtifactError, match=words):  # typed: one line, not a TypeError where it is used
            read_sidecar(engine)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here; this checks the message shown without it")
def test_build_engine_without_tensorrt_is_missing_dependency(tmp_path, convnet_export):
    with pytest.raises(MissingDependency) as e:
        build_engine(convnet_export.onnx_path, tmp_path)
    assert str(e.value) == TRT_HINT
    assert TRT_HINT == "TensorRT is not installed: pip install 'ctxsim[trt]' (or use JetPack's TensorRT on Jetson)"
    assert not list(tmp_path.iterdir())


def test_build_engine_checks_options_first(tmp_path, convnet_export):
    with pytest.raises(ConfigError, match="precision"):
        build_engine(convnet_export.onnx_path, tmp_path, precision="int4")
    with pytest.raises(ConfigError, match="min_batch"):
        build_engine(convnet_export.onnx_path, tmp_path, min_batch=8, opt_batch=4)
    # strongly typed: the file's types decide, so a precision the file does not have names the file to use
    with pytest.raises(ConfigError, match="built from model.fp16.onnx"):
        build_engine(convnet_export.onnx_path, tmp_path, precision="fp16")
    with pytest.raises(ConfigError, match=r"built from model.int8.onnx.*ctxsim export --int8"):
        build_engine(convnet_export.onnx_path, tmp_path, precision="int8")
    with pytest.raises(ConfigError, match="built from model.onnx"):
        build_engine(convnet_export.fp16_path, tmp_path, precision="fp32")
    assert not list(tmp_path.iterdir())


def test_engine_precision_is_the_onnx_files():
    assert [engine_precision(p) for p in ("fp32", "fp16", "int8")] == ["fp32", "fp16", "int8"]
    assert engine_precision("int8", "int8") == "int8"
    with pytest.raises(ConfigError, match="model.onnx, model.fp16.onnx, model.int8.onnx"):
        engine_precision("bf16")
    with pytest.raises(ConfigError, match="precision must be one of"):
        engine_precision("fp32", "fp8")


@pytest.mark.parametrize("version,major", [("10.3.0.30", 10), ("10.13.3.9", 10), ("11.4.0.11", 11), (" 11.0 ", 11)])
def test_supported_tensorrt_majors(version, major):
    assert tensorrt_major(version) == major and major in SUPPORTED_MAJORS


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "12.0.0", "abc", ""])
def test_other_tensorrt_majors_are_refused_in_one_line(version):
    with pytest.raises(MissingDependency) as e:
        tensorrt_major(version)
    msg = str(e.value)
    assert "\n" not in msg and f"TensorRT {version} is installed" in msg and "10.x or 11.x" in msg


def test_network_is_strongly_typed_by_flag_on_10_and_by_default_on_11():
    # TensorRT 10: STRONGLY_TYPED is bit 1 of NetworkDefinitionCreationFlag (EXPLICIT_BATCH is bit 0)
    assert network_flags(10, 1) == 0b10
    assert network_flags(11, 1) == 0  # deprecated and ignored in 11: not passed, in case it is removed


def test_sidecar_records_major_and_build_mode(convnet_export):
    sc = engine_sidecar({**ORIN, "tensorrt_version": "11.4.0.11"}, "fp16", {"min": [1]}, "cd" * 32,
                        convnet_export.contract, onnx_name="model.fp16.onnx")
    assert (sc["tensorrt_major"], sc["build_mode"], sc["onnx_name"]) == (11, "strongly_typed", "model.fp16.onnx")
    assert engine_sidecar(ORIN, "fp32", {}, "", convnet_export.contract)["tensorrt_major"] == 10
    with pytest.raises(MissingDependency):
        engine_sidecar({**ORIN, "tensorrt_version": "9.2.0"}, "fp32", {}, "", convnet_export.contract)


# ------------------------------------------------------------------------------------ needs TensorRT + CUDA
def _typed_onnx(tmp_path, convnet_run, convnet_export, precision):
    """The ONNX file an engine of ``precision`` is built from, copied into tmp_path."""
    import shutil

    from ctxsim.export import quantize_onnx
    from ctxsim.export.quantize import image_batches, run_calibration_images

    if precision == "int8":
        return quantize_onnx(convnet_export.onnx_path,
                             image_batches(run_calibration_images(convnet_run, 128), convnet_export.contract),
                             out_path=tmp_path / "model.int8.onnx")
    src = convnet_export.fp16_path if precision == "fp16" else convnet_export.onnx_path
    return Path(shutil.copy(src, tmp_path / src.name))


@pytest.mark.tensorrt
@NEEDS_TRT
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_strongly_typed_engine_builds_runs_and_passes_parity(tmp_path, convnet_run, convnet_export, precision):
    from ctxsim.export import check_parity, open_runner

    source = _typed_onnx(tmp_path, convnet_run, convnet_export, precision)
    build = build_engine(source, tmp_path, max_batch=32, timing_cache=tmp_path / "timing.cache")
    assert build.path.name == f"model.{precision}.engine" and (tmp_path / "timing.cache").is_file()
    assert build.sidecar["build_mode"] == "strongly_typed" and build.sidecar["tensorrt_major"] in SUPPORTED_MAJORS
    assert build.sidecar["onnx_name"] == source.name and build.sidecar["precision"] == precision
    runner = open_runner(build.path)
    assert runner.name == "tensorrt" and runner.contract["precision"] == precision
    x = np.random.default_rng(0).standard_normal((70, 1, 28, 28)).astype(np.float32)  # > max batch: split
    assert runner.run(x).shape == (70, 64)
    report = check_parity(convnet_run, build.path, limit=400)
    assert report.passed, report.failures


@pytest.mark.tensorrt
@NEEDS_TRT
def test_export_trt_takes_the_typed_file_of_each_precision(tmp_path, convnet_run):
    from ctxsim.export import export_run

    for precision, source in (("fp16", "model.fp16.onnx"), ("int8", "model.int8.onnx")):
        out = tmp_path / precision
        result = export_run(convnet_run, out, fp16=False, trt=True, precision=precision, parity_limit=400)
        assert result.engine_sidecar["onnx_name"] == source and (out / source).is_file()
        assert result.passed, {k: r.failures for k, r in result.parity.items()}
