"""Runners: opening artifacts, rejecting damaged or foreign files with one-line ArtifactErrors, input checks."""
from __future__ import annotations

import importlib.util
import io
import sys

import numpy as np
import pytest
import torch

from ctxsim.errors import ArtifactError, ConfigError, MissingDependency
from ctxsim.export import OnnxRunner, open_runner, resolve_artifact
from ctxsim.export.runners import default_providers, install_problem

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_truncated_onnx_is_artifact_error(tmp_path, convnet_export):
    data = convnet_export.onnx_path.read_bytes()
    bad = tmp_path / "model.onnx"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match="not a loadable ONNX model") as e:
        open_runner(bad)
    _one_line(e)


def test_random_file_is_artifact_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ArtifactError) as e:
        open_runner(bad)
    _one_line(e)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_foreign_onnx_without_ctxsim_metadata_is_artifact_error(tmp_path):
    buf = io.BytesIO()
    torch.onnx.export(torch.nn.Linear(4, 2).eval(), (torch.randn(1, 4),), buf, dynamo=False,
                      input_names=["images"], output_names=["embeddings"])
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(buf.getvalue())
    with pytest.raises(ArtifactError, match="no ctxsim metadata") as e:
        open_runner(foreign)
    _one_line(e)


def test_missing_unknown_and_folder_paths(tmp_path, convnet_export):
    with pytest.raises(ArtifactError, match="not found"):
        open_runner(tmp_path / "absent.onnx")
    other = tmp_path / "model.pt"
    other.write_bytes(b"x")
    with pytest.raises(ArtifactError, match="expected .onnx"):
        open_runner(other)
    with pytest.raises(ArtifactError, match="no model.onnx"):
        open_runner(tmp_path)
    runner = open_runner(convnet_export.out_dir)  # an export folder opens its model.onnx
    assert isinstance(runner, OnnxRunner) and runner.path == convnet_export.onnx_path


def test_resolve_artifact_by_folder_and_any_case_suffix(tmp_path, convnet_run, convnet_export):
    assert resolve_artifact(convnet_run) == ("torch", convnet_run)
    assert resolve_artifact(convnet_run / "model.json") == ("torch", convnet_run)
    assert resolve_artifact(convnet_export.out_dir) == ("onnx", convnet_export.onnx_path)
    for name, kind in [("MODEL.ONNX", "onnx"), ("m.Onnx", "onnx"), ("m.engine", "tensorrt"), ("m.plan", "tensorrt"),
                       ("m.trt", "tensorrt"), ("M.TRT", "tensorrt"), ("m.Engine", "tensorrt")]:
        (tmp_path / name).write_bytes(b"")
        assert resolve_artifact(tmp_path / name) == (kind, tmp_path / name), name
    (tmp_path / "m.pt").write_bytes(b"")
    with pytest.raises(ArtifactError, match="not a model artifact"):
        resolve_artifact(tmp_path / "m.pt")
    with pytest.raises(ArtifactError, match="is a run folder"):
        open_runner(convnet_run)


def test_upper_case_onnx_opens_and_device_cpu_keeps_the_cpu_provider(tmp_path, convnet_export):
    upper = tmp_path / "MODEL.ONNX"
    upper.write_bytes(convnet_export.onnx_path.read_bytes())
    runner = open_runner(upper, device="cpu")
    assert isinstance(runner, OnnxRunner) and runner.name == "onnxruntime:CPUExecutionProvider"
    x = np.zeros((2, 1, 28, 28), np.float32)
    np.testing.assert_array_equal(runner.run(x), open_runner(convnet_export.onnx_path).run(x))


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here; this checks the message shown without it")
@pytest.mark.parametrize("name", ["model.fp16.trt", "MODEL.ENGINE", "model.Plan"])
def test_any_engine_suffix_takes_the_tensorrt_path(tmp_path, name):
    engine = tmp_path / name
    engine.write_bytes(b"\0" * 64)
    with pytest.raises(MissingDependency, match=r"pip install 'ctxsim\[trt\]'"):
        open_runner(engine)
    with pytest.raises(ConfigError, match="ONNX models only"):
        open_runner(engine, providers=["CPUExecutionProvider"])


def test_runner_interface_and_input_checks(convnet_export):
    runner = open_runner(convnet_export.onnx_path, providers=["CPUExecutionProvider"])
    assert runner.name == "onnxruntime:CPUExecutionProvider"
    assert runner.contract["embedding_dim"] == 64
    out = runner.run(np.zeros((3, 1, 28, 28), np.float64))  # float64 is cast
    assert out.shape == (3, 64) and out.dtype == np.float32
    assert runner.run(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 64)
    with pytest.raises(ConfigError, match=r"shape \[N, 1, 28, 28\]"):
        runner.run(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(ConfigError, match="float32"):
        runner.run(np.zeros((2, 1, 28, 28), np.uint8))


def test_default_providers_prefer_tensorrt_then_cuda_then_cpu():
    assert default_providers(["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]) == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert default_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here; this checks the message shown without it")
def test_engine_without_tensorrt_is_missing_dependency(tmp_path):
    engine = tmp_path / "model.fp16.engine"
    engine.write_bytes(b"\0" * 64)
    with pytest.raises(MissingDependency, match=r"pip install 'ctxsim\[trt\]'"):
        open_runner(engine)


def test_no_onnxruntime_names_the_extras(monkeypatch, convnet_export):
    """ONNX Runtime is an extra ([cpu] or [gpu], never both): without either, one line says which to install."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(MissingDependency, match=r"pip install 'ctxsim\[cpu\]' \(CPU\) or 'ctxsim\[gpu\]'") as e:
        open_runner(convnet_export.onnx_path)
    assert "Jetson" in _one_line(e)
    with pytest.raises(MissingDependency):
        default_providers()


def test_onnxruntime_is_an_extra_not_a_core_dependency():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("onnxruntime") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["onnxruntime>=1.18"] and any(d.startswith("onnxruntime-gpu") for d in extras["gpu"])
    assert not any(d.startswith("onnxruntime-gpu") for d in extras["cpu"])
    assert any("cpu" in d for d in extras["dev"] if d.startswith("ctxsim["))  # the README's install has a runtime


def test_a_shadowed_gpu_onnxruntime_is_named():
    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert install_problem({"onnxruntime"}, cpu_only) is None  # a CPU machine: fine
    assert install_problem({"onnxruntime-gpu"}, ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None
    msg = install_problem({"onnxruntime", "onnxruntime-gpu"}, cpu_only)  # both wheels, the CPU one won
    assert msg and "onnxruntime-gpu is installed and the CPU wheel onnxruntime" in msg and "pip uninstall" in msg
    assert "is installed, but" in install_problem({"onnxruntime-gpu"}, cpu_only)  # e.g. no CUDA libraries
    assert default_providers()[-1] == "CPUExecutionProvider"  # the real detection path runs on this machine
