"""TensorRT engines: build one from a typed ctxsim ONNX file as a strongly typed network, check that it fits the
machine, and run it. One path for TensorRT 10.x (JetPack) and 11.x (servers).

TensorRT 11 removed weak typing and calibrators, so an engine's precision is that of the ONNX file it is built
from (``model.onnx`` fp32, ``model.fp16.onnx``, ``model.int8.onnx`` with explicit Q/DQ) and no precision flag is
set; 10.x networks are created STRONGLY_TYPED, 11.x ones are so by default. API: ``build_engine``,
``check_engine_compatible``, ``TensorRTRunner``; an engine ``model.<precision>.engine`` has a sidecar
``.engine.json`` (TensorRT version, GPU, compute capability, precision, profile, source ONNX sha256, contract).
NOT EXECUTED on this project's machines (no TensorRT): the calls are type-checked against typings/
(tests/export/test_trt_typecheck.py), no API removed in 11 is used (tests/export/test_trt_static.py), and every
ONNX file is checked against onnx-tensorrt's operator matrix first. The story: docs/EXPORT.md, "TensorRT".
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from ctxsim.errors import ArtifactError, ConfigError, MissingDependency
from ctxsim.export.contract import check_batch
from ctxsim.io import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from ctxsim.schema import check

if TYPE_CHECKING:  # annotations only: tensorrt is imported inside the functions that run it
    import tensorrt as trt
    import torch

__all__ = ["BUILD_MODE", "ENGINE_PRECISIONS", "ONNX_FOR_PRECISION", "SUPPORTED_MAJORS", "TRT_HINT", "EngineBuild",
           "EngineSidecar", "TensorRTRunner", "build_engine", "check_engine_compatible", "current_device",
           "engine_precision", "engine_sidecar", "import_tensorrt", "network_flags", "read_sidecar", "sidecar_path",
           "tensorrt_major"]

log = logging.getLogger(__name__)

TRT_HINT = "TensorRT is not installed: pip install 'ctxsim[trt]' (or use JetPack's TensorRT on Jetson)"
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
#: TensorRT majors this build path is written for: 10.x (JetPack 6/7, strongly typed by flag) and 11.x
SUPPORTED_MAJORS = (10, 11)
BUILD_MODE = "strongly_typed"
#: the ONNX file each engine precision is built from (the file's own types decide the engine's)
ONNX_FOR_PRECISION = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


def tensorrt_major(version: str) -> int:
    """The major of a TensorRT version string, refused with one line unless this build path supports it."""
    head = str(version).strip().split(".")[0]
    major = int(head) if head.isdigit() else -1
    if major not in SUPPORTED_MAJORS:
        raise MissingDependency(f"TensorRT {version} is installed; ctxsim builds engines with TensorRT "
                                f"{' or '.join(f'{m}.x' for m in SUPPORTED_MAJORS)}: pip install 'ctxsim[trt]' "
                                "(servers) or use JetPack's TensorRT 10 (Jetson)")
    return major


def network_flags(major: int, strongly_typed_bit: int) -> int:
    """``create_network`` flags for a strongly typed network: the STRONGLY_TYPED bit on 10.x; nothing on 11.x,
    where every network is strongly typed and the flag is deprecated (ignored, and may go)."""
    return 1 << int(strongly_typed_bit) if major == 10 else 0


def import_tensorrt() -> ModuleType:
    """``import tensorrt`` (MissingDependency with the install hint) of a supported major."""
    try:
        import tensorrt
    except ImportError:
        raise MissingDependency(TRT_HINT) from None
    tensorrt_major(getattr(tensorrt, "__version__", "?"))
    return tensorrt


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise MissingDependency("TensorRT engines need a CUDA GPU and none is visible "
                                "(torch.cuda.is_available() is False); build and run engines on the target device")


def current_device() -> dict[str, str]:
    """This machine's GPU name, compute capability ("8.7") and TensorRT version, as the sidecar records them."""
    import torch

    import_tensorrt()
    import tensorrt as trt

    version = trt.__version__
    _require_cuda()
    major, minor = torch.cuda.get_device_capability()
    return {"gpu_name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "tensorrt_version": version}


class _SidecarKeys(TypedDict):
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: dict[str, list[int]]
    contract: dict[str, Any]


class EngineSidecar(_SidecarKeys, total=False):
    """An engine's sidecar JSON (:func:`engine_sidecar`) as readers check it; other keys are kept as they are."""

    tensorrt_major: int
    onnx_name: str | None
    onnx_sha256: str
    fingerprint: str
    engine_sha256: str


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ArtifactError(f"{Path(engine_path).name} has no sidecar {path.name}; rebuild the engine with "
                            "`ctxsim export --trt` (the sidecar records the device and contract)")
    return check(read_json(path), EngineSidecar, "sidecar", error=ArtifactError, where=str(path),
                 hint="rebuild the engine with `ctxsim export --trt`")


def _trt_version_key(version: str) -> tuple[str, ...]:
    """Major.minor.patch: engines are only portable between identical TensorRT releases."""
    return tuple(str(version).strip().split(".")[:3])


def check_engine_compatible(sidecar: Mapping[str, Any], current_device: Mapping[str, str]) -> None:
    """Stop with an ArtifactError when the engine was built for another GPU kind, compute capability or
    TensorRT version than ``current_device`` ({"gpu_name", "compute_capability", "tensorrt_version"}). Pure."""
    problems = []
    built_gpu, here_gpu = str(sidecar.get("gpu_name", "?")), str(current_device.get("gpu_name", "?"))
    if built_gpu.strip().lower() != here_gpu.strip().lower():
        problems.append(f"GPU {built_gpu!r} vs {here_gpu!r} here")
    built_cc, here_cc = str(sidecar.get("compute_capability", "?")), str(current_device.get("compute_capability", "?"))
    if built_cc != here_cc:
        problems.append(f"compute capability {built_cc} vs {here_cc} here")
    built_trt, here_trt = str(sidecar.get("tensorrt_version", "?")), str(current_device.get("tensorrt_version", "?"))
    if _trt_version_key(built_trt) != _trt_version_key(here_trt):
        problems.append(f"TensorRT {built_trt} vs {here_trt} here")
    if problems:
        raise ArtifactError(f"this TensorRT engine was built for another device ({'; '.join(problems)}); engines "
                            "are not portable: rebuild it on the target with `ctxsim export --trt` from model.onnx")


# ---------------------------------------------------------------------------------------------- build
@dataclass
class EngineBuild:
    path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]


def engine_sidecar(device: Mapping[str, str], precision: str, profile: Mapping[str, list[int]], onnx_sha256: str,
                   contract: Mapping[str, Any], build_seconds: float | None = None,
                   workspace_gb: float | None = None, onnx_name: str | None = None) -> dict[str, Any]:
    """The JSON written next to an engine (pure; tested without TensorRT)."""
    return {
        "format": "tensorrt_engine", "tensorrt_version": device["tensorrt_version"],
        "tensorrt_major": tensorrt_major(device["tensorrt_version"]), "build_mode": BUILD_MODE,
        "gpu_name": device["gpu_name"], "compute_capability": device["compute_capability"], "precision": precision,
        "profile": dict(profile), "onnx_name": onnx_name, "onnx_sha256": onnx_sha256,
        "fingerprint": contract.get("fingerprint", ""), "contract": {**contract, "precision": precision},
        "build_seconds": build_seconds, "workspace_gb": workspace_gb,
    }


def engine_precision(onnx_precision: str, precision: str | None = None) -> str:
    """The precision of an engine built from an ONNX file of ``onnx_precision`` (pure, tested without TensorRT).

    A strongly typed network takes its types from the file, so the two must agree; asking for another precision
    names the file to build from instead."""
    if onnx_precision not in ENGINE_PRECISIONS:
        raise ConfigError(f"an ONNX file of precision {onnx_precision!r} cannot become an engine; build from "
                          f"{', '.join(ONNX_FOR_PRECISION.values())}")
    if precision is None or precision == onnx_precision:
        return onnx_precision
    if precision not in ENGINE_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
    how = {"fp16": "ctxsim export (fp16 is on by default)", "int8": "ctxsim export --int8"}.get(precision, "")
    raise ConfigError(f"{precision} engines are built from {ONNX_FOR_PRECISION[precision]}, not from an "
                      f"{onnx_precision} file (engines are strongly typed: the file's types decide)"
                      + (f"; write it with {how}" if how else ""))


def build_engine(onnx_path: str | Path, out_dir: str | Path, precision: str | None = None, min_batch: int = 1,
                 opt_batch: int = 16, max_batch: int = 64, workspace_gb: float = 2.0,
                 timing_cache: str | Path | None = None) -> EngineBuild:
    """Build ``out_dir/model.<precision>.engine`` (+ sidecar JSON) from a ctxsim ONNX file on this GPU, as a
    strongly typed network (the one path TensorRT 10 and 11 share).

    The engine's precision is the file's: model.onnx -> fp32, model.fp16.onnx -> fp16, model.int8.onnx (Q/DQ,
    ``ctxsim export --int8``) -> int8; ``precision``, when given, must agree. The file is checked against
    onnx-tensorrt's operator matrix for the installed major before parsing. ``timing_cache`` (a file) is read if
    present and written back after the build. The batch profile is [min_batch, opt_batch, max_batch].
    """
    from ctxsim.export.onnx_export import read_onnx_contract

    if precision is not None and precision not in ENGINE_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
    if not 1 <= int(min_batch) <= int(opt_batch) <= int(max_batch):
        raise ConfigError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    contract = read_onnx_contract(onnx_path)
    precision = engine_precision(contract.get("precision", "fp32"), precision)
    import_tensorrt()  # the install hint, or a refusal naming the supported majors
    import tensorrt as trt  # by name, so that mypy checks every call below against the TensorRT stubs

    from ctxsim.export.trt_compat import check_onnx_for_tensorrt

    device = current_device()
    major = tensorrt_major(device["tensorrt_version"])
    check_onnx_for_tensorrt(onnx_path, majors=(major,))  # one line naming the operator, not a parser dump

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = network_flags(major, int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major == 10 else 0)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise ArtifactError(f"TensorRT cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    name, rest = contract["input_name"], list(contract["input_shape"][1:])
    shapes = {"min": [int(min_batch), *rest], "opt": [int(opt_batch), *rest], "max": [int(max_batch), *rest]}
    profile = builder.create_optimization_profile()
    profile.set_shape(name, trt.Dims(shapes["min"]), trt.Dims(shapes["opt"]), trt.Dims(shapes["max"]))
    config.add_optimization_profile(profile)

    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise ArtifactError(f"TensorRT could not build a {precision} engine from {onnx_path.name}; "
                            "see the TensorRT log above, or try a larger workspace")
    engine_path = out_dir / f"model.{precision}.engine"
    sidecar = engine_sidecar(device, precision, shapes, sha256_file(onnx_path), contract, round(seconds, 1),
                             workspace_gb, onnx_path.name)
    atomic_write_bytes(engine_path, bytes(serialized))
    sidecar["engine_sha256"] = sha256_file(engine_path)
    atomic_write_json(sidecar_path(engine_path), sidecar)
    if cache is not None and timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(cache.serialize()))
    return EngineBuild(engine_path, sidecar_path(engine_path), sidecar)


# ---------------------------------------------------------------------------------------------- run
class TensorRTRunner:
    """Runs a ctxsim TensorRT engine on the current CUDA device; batches above the profile's max are split."""

    def __init__(self, path: str | Path, check_device: bool = True):
        import torch

        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path} not found")
        import_tensorrt()
        import tensorrt as trt  # by name: mypy checks these calls against the stubs

        _require_cuda()
        self.sidecar = read_sidecar(self.path)
        if check_device:
            check_engine_compatible(self.sidecar, current_device())
        self.contract: dict[str, Any] = dict(self.sidecar["contract"])
        self.max_batch = int(self.sidecar["profile"]["max"][0])
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT cannot load {self.path.name}; rebuild it on this device")
        self.context = self.engine.create_execution_context()
        self._in, self._out = self.contract["input_name"], self.contract["output_name"]
        self._out_dtype = _torch_dtype(self.engine.get_tensor_dtype(self._out))
        self._device = torch.device("cuda")
        self.name = "tensorrt"

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = check_batch(batch, self.contract, self.path.name)
        outs = []
        stream = torch.cuda.current_stream(self._device)
        for start in range(0, len(x), self.max_batch):
            chunk = torch.from_numpy(x[start:start + self.max_batch]).to(self._device, non_blocking=False)
            self.context.set_input_shape(self._in, tuple(chunk.shape))
            out = torch.empty((chunk.shape[0], int(self.contract["embedding_dim"])), dtype=self._out_dtype,
                              device=self._device)
            self.context.set_tensor_address(self._in, int(chunk.data_ptr()))
            self.context.set_tensor_address(self._out, int(out.data_ptr()))
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise ArtifactError(f"TensorRT failed to run {self.path.name}")
            stream.synchronize()
            outs.append(out.float().cpu().numpy())
        if not outs:
            return np.zeros((0, self.contract["embedding_dim"]), np.float32)
        return np.ascontiguousarray(np.concatenate(outs), dtype=np.float32)


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if dtype not in table:
        raise ArtifactError(f"unexpected engine output dtype {dtype}; rebuild the engine from a ctxsim ONNX file")
    return table[dtype]
