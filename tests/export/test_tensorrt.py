"""TensorRT: the pure parts (device compatibility, sidecar, calibration batches, missing-TensorRT message) run
everywhere; engine build/run tests are marked `tensorrt` and skip unless TensorRT imports and CUDA is available."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ctxsim.errors import ArtifactError, ConfigError, MissingDependency
from ctxsim.export import build_engine, check_engine_compatible, preprocess_batch
from ctxsim.export.tensorrt import (TRT_HINT, calibration_batches, engine_sidecar, list_images, read_sidecar,
                                    sidecar_path)

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


def test_calibration_batches_are_preprocessed_real_images(tmp_path, omniglot_images, convnet_export):
    folder = tmp_path / "calib" / "sub"
    folder.mkdir(parents=True)
    for i, im in enumerate(omniglot_images[:20]):
        im.save(folder / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    batches = list(calibration_batches(tmp_path / "calib", convnet_export.contract, batch_size=8, limit=None))
    assert len(batches) == 2 and all(b.shape == (8, 1, 28, 28) and b.dtype == np.float32 for b in batches)
    files = list_images(tmp_path / "calib")
    from PIL import Image

    np.testing.assert_array_equal(batches[0], preprocess_batch([Image.open(p) for p in files[:8]],
                                                               convnet_export.contract))
    assert len(list_images(tmp_path / "calib", limit=5)) == 5
    with pytest.raises(ConfigError, match="fewer than one batch"):
        list(calibration_batches(tmp_path / "calib", convnet_export.contract, batch_size=64))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        list_images(tmp_path / "empty")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here; this checks the message shown without it")
def test_build_engine_without_tensorrt_is_missing_dependency(tmp_path, convnet_export):
    with pytest.raises(MissingDependency) as e:
        build_engine(convnet_export.onnx_path, tmp_path, precision="fp16")
    assert str(e.value) == TRT_HINT
    assert TRT_HINT == "TensorRT is not installed: pip install 'ctxsim[trt]' (or use JetPack's TensorRT on Jetson)"
    assert not list(tmp_path.iterdir())


def test_build_engine_checks_options_first(tmp_path, convnet_export):
    with pytest.raises(ConfigError, match="precision"):
        build_engine(convnet_export.onnx_path, tmp_path, precision="int4")
    with pytest.raises(ConfigError, match="min_batch"):
        build_engine(convnet_export.onnx_path, tmp_path, min_batch=8, opt_batch=4)
    with pytest.raises(ConfigError, match="fp32 model.onnx"):
        build_engine(convnet_export.fp16_path, tmp_path)
    with pytest.raises(ConfigError, match="calibration images"):
        build_engine(convnet_export.onnx_path, tmp_path, precision="int8")


def test_engine_mode_picks_explicit_quantisation_for_the_qdq_file():
    from ctxsim.export.tensorrt import engine_mode

    assert engine_mode("int8", "int8", False, False) == "explicit"  # model.int8.onnx: scales in the graph
    assert engine_mode("fp32", "int8", True, False) == "calibrate"
    assert engine_mode("fp32", "int8", False, True) == "calibrate"  # a cache from an earlier calibration
    assert engine_mode("fp32", "fp16", False, False) == "plain"
    with pytest.raises(ConfigError, match="build it with precision int8"):
        engine_mode("int8", "fp16", False, False)
    with pytest.raises(ConfigError, match="model.int8.onnx"):
        engine_mode("fp32", "int8", False, False)
    with pytest.raises(ConfigError, match="not an fp16 file"):
        engine_mode("fp16", "fp16", False, False)


# ------------------------------------------------------------------------------------ needs TensorRT + CUDA
@pytest.mark.tensorrt
@NEEDS_TRT
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_runs_and_passes_parity(tmp_path, convnet_run, convnet_export, precision):
    import shutil

    from ctxsim.export import check_parity, open_runner

    shutil.copy(convnet_export.onnx_path, tmp_path / "model.onnx")
    build = build_engine(tmp_path / "model.onnx", tmp_path, precision=precision, max_batch=32,
                         timing_cache=tmp_path / "timing.cache")
    assert build.path.name == f"model.{precision}.engine" and (tmp_path / "timing.cache").is_file()
    runner = open_runner(build.path)
    assert runner.name == "tensorrt" and runner.contract["precision"] == precision
    x = np.random.default_rng(0).standard_normal((70, 1, 28, 28)).astype(np.float32)  # > max batch: split
    assert runner.run(x).shape == (70, 64)
    report = check_parity(convnet_run, build.path, limit=400)
    assert report.passed, report.failures


@pytest.mark.tensorrt
@NEEDS_TRT
def test_int8_engine_with_calibration_passes_int8_thresholds(tmp_path, convnet_run, convnet_export, omniglot_images):
    import shutil

    from ctxsim.export import check_parity

    calib = tmp_path / "calib"
    calib.mkdir()
    for i, im in enumerate(omniglot_images):
        im.save(calib / f"{i:03d}.png")
    shutil.copy(convnet_export.onnx_path, tmp_path / "model.onnx")
    build = build_engine(tmp_path / "model.onnx", tmp_path, precision="int8", calib_images=calib,
                         calib_batch_size=8)
    assert build.sidecar["precision"] == "int8"
    assert list(tmp_path.glob("calibration.*.cache"))
    report = check_parity(convnet_run, build.path, limit=400)
    assert report.passed, report.failures


@pytest.mark.tensorrt
@NEEDS_TRT
def test_int8_engine_from_the_qdq_onnx_needs_no_calibrator(tmp_path, convnet_run, convnet_export):
    from ctxsim.export import check_parity, quantize_onnx
    from ctxsim.export.quantize import image_batches, run_calibration_images

    qdq = quantize_onnx(convnet_export.onnx_path, image_batches(run_calibration_images(convnet_run, 128),
                                                                convnet_export.contract),
                        out_path=tmp_path / "model.int8.onnx")
    build = build_engine(qdq, tmp_path, precision="int8")
    assert build.sidecar["precision"] == "int8" and not list(tmp_path.glob("calibration.*.cache"))
    report = check_parity(convnet_run, build.path, limit=400)
    assert report.passed, report.failures
