"""TensorRT engines: build one from a ctxsim ONNX file (fp32/fp16/int8 with calibration), check that it fits
the machine, and run it.

Written against the TensorRT 10 Python API (explicit batch by default, ``set_memory_pool_limit``,
``build_serialized_network``, named I/O tensors with ``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3``; torch CUDA tensors serve as device buffers). NOT EXECUTED on this project's development
machines, which have no TensorRT; see docs/EXPORT.md. The pure parts (sidecar, compatibility check, calibration
batches) are tested without it.

An engine ``model.<precision>.engine`` comes with a sidecar ``model.<precision>.engine.json`` naming the TensorRT
version, GPU, compute capability, precision, optimisation profile, the source ONNX's sha256 and the contract.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ctxsim.errors import ArtifactError, ConfigError, MissingDependency
from ctxsim.export.contract import check_batch, preprocess_batch
from ctxsim.io import atomic_write_bytes, atomic_write_json, read_json, sha256_file

log = logging.getLogger(__name__)

TRT_HINT = "TensorRT is not installed: pip install 'ctxsim[trt]' (or use JetPack's TensorRT on Jetson)"
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def import_tensorrt():
    """``import tensorrt`` or MissingDependency with the install hint."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependency(TRT_HINT) from None
    return trt


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise MissingDependency("TensorRT engines need a CUDA GPU and none is visible "
                                "(torch.cuda.is_available() is False); build and run engines on the target device")


def current_device() -> dict[str, str]:
    """This machine's GPU name, compute capability ("8.7") and TensorRT version, as the sidecar records them."""
    import torch

    trt = import_tensorrt()
    _require_cuda()
    major, minor = torch.cuda.get_device_capability()
    return {"gpu_name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "tensorrt_version": str(trt.__version__)}


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ArtifactError(f"{Path(engine_path).name} has no sidecar {path.name}; rebuild the engine with "
                            "`ctxsim export --trt` (the sidecar records the device and contract)")
    sidecar = read_json(path)
    for key in ("tensorrt_version", "gpu_name", "compute_capability", "precision", "profile", "contract"):
        if key not in sidecar:
            raise ArtifactError(f"{path} lacks {key!r}; rebuild the engine with `ctxsim export --trt`")
    return sidecar


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


# ---------------------------------------------------------------------------------------------- calibration data
def list_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively), in sorted order, at most ``limit``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"calibration image folder {folder} not found")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}; "
                          "point --calib at a folder of representative images")
    if limit is not None:
        step = max(1, len(files) // int(limit))  # spread over the folder rather than its first classes
        files = files[::step][: int(limit)]
    return files


def calibration_batches(folder: str | Path, contract: Mapping[str, Any], batch_size: int = 16,
                        limit: int | None = 512) -> Iterator[np.ndarray]:
    """Full batches of real images from ``folder`` through ``preprocess_batch`` (a short last batch is dropped:
    the calibrator's batch size is fixed)."""
    from ctxsim.data.datasets import open_image

    files = list_images(folder, limit)
    if len(files) < batch_size:
        raise ConfigError(f"{len(files)} calibration images under {folder}, fewer than one batch of {batch_size}")
    for start in range(0, len(files) - batch_size + 1, batch_size):
        yield preprocess_batch([open_image(p) for p in files[start:start + batch_size]], contract)


def _make_calibrator(trt, batches: Iterator[np.ndarray], batch_size: int, cache_path: Path | None,
                     algorithm: str = "entropy"):
    """An IInt8EntropyCalibrator2 (or MinMax) feeding ``batches`` from a torch CUDA buffer."""
    import torch

    base = trt.IInt8EntropyCalibrator2 if algorithm == "entropy" else trt.IInt8MinMaxCalibrator

    class _Calibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.batches, self.buffer, self.count = batches, None, 0

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names):  # noqa: ANN001 - TensorRT's signature
            try:
                batch = next(self.batches)
            except StopIteration:
                return None
            self.buffer = torch.from_numpy(batch).cuda().contiguous()  # kept alive until the next call
            self.count += 1
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self):
            if cache_path is not None and cache_path.is_file():
                log.info("using INT8 calibration cache %s", cache_path)
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache) -> None:  # noqa: ANN001
            if cache_path is not None:
                atomic_write_bytes(cache_path, bytes(cache))

    return _Calibrator()


# ---------------------------------------------------------------------------------------------- build
@dataclass
class EngineBuild:
    path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]


def engine_sidecar(device: Mapping[str, str], precision: str, profile: Mapping[str, list[int]], onnx_sha256: str,
                   contract: Mapping[str, Any], build_seconds: float | None = None,
                   workspace_gb: float | None = None) -> dict[str, Any]:
    """The JSON written next to an engine (pure; tested without TensorRT)."""
    return {
        "format": "tensorrt_engine", "tensorrt_version": device["tensorrt_version"], "gpu_name": device["gpu_name"],
        "compute_capability": device["compute_capability"], "precision": precision, "profile": dict(profile),
        "onnx_sha256": onnx_sha256, "fingerprint": contract.get("fingerprint", ""),
        "contract": {**contract, "precision": precision}, "build_seconds": build_seconds,
        "workspace_gb": workspace_gb,
    }


def engine_mode(onnx_precision: str, precision: str, have_calib_images: bool, have_calib_cache: bool) -> str:
    """How an engine of ``precision`` is built from an ONNX file of ``onnx_precision`` (pure, tested without
    TensorRT): "explicit" for a Q/DQ int8 file (``ctxsim export --int8``: its scales are in the graph, no
    calibrator), "calibrate" for int8 from fp32 (TensorRT's calibrator), "plain" otherwise."""
    if onnx_precision == "int8":
        if precision != "int8":
            raise ConfigError("model.int8.onnx holds int8 scales: build it with precision int8, or build "
                              f"{precision} from the fp32 model.onnx")
        return "explicit"
    if onnx_precision != "fp32":
        raise ConfigError(f"build engines from the fp32 model.onnx (or model.int8.onnx for int8), not an "
                          f"{onnx_precision} file (TensorRT picks fp16/int8 kernels itself)")
    if precision == "int8":
        if not (have_calib_images or have_calib_cache):
            raise ConfigError("an int8 engine needs calibration images (--calib FOLDER), a calibration cache, or "
                              "the Q/DQ model.int8.onnx (ctxsim export --int8)")
        return "calibrate"
    return "plain"


def build_engine(onnx_path: str | Path, out_dir: str | Path, precision: str = "fp16",
                 calib_images: str | Path | None = None, min_batch: int = 1, opt_batch: int = 16,
                 max_batch: int = 64, workspace_gb: float = 2.0, timing_cache: str | Path | None = None,
                 calib_batch_size: int = 16, calib_limit: int | None = 512, calib_cache: str | Path | None = None,
                 calib_algorithm: str = "entropy") -> EngineBuild:
    """Build ``out_dir/model.<precision>.engine`` (+ sidecar JSON) from a ctxsim ONNX file on this GPU.

    ``precision`` fp32 | fp16 | int8. INT8 from model.onnx needs ``calib_images`` (a folder of representative real
    images, preprocessed with the model's contract; entropy calibration, or ``calib_algorithm="minmax"``) or an
    existing ``calib_cache``; layers without INT8 kernels fall back to fp16. INT8 from the Q/DQ model.int8.onnx
    uses the scales in the graph (explicit quantisation, strongly typed network, no calibrator). ``timing_cache``
    (a file) is read if present and written back after the build. The batch profile is [min_batch, opt_batch,
    max_batch].
    """
    from ctxsim.export.onnx_export import read_onnx_contract

    if precision not in ENGINE_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
    if not 1 <= int(min_batch) <= int(opt_batch) <= int(max_batch):
        raise ConfigError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    if calib_algorithm not in ("entropy", "minmax"):
        raise ConfigError(f"calib_algorithm must be entropy or minmax, got {calib_algorithm!r}")
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    contract = read_onnx_contract(onnx_path)
    # a calibration cache is only valid for the model it was made with: the default name carries its fingerprint
    cache_file = Path(calib_cache) if calib_cache else out_dir / f"calibration.{contract['fingerprint']}.cache"
    explicit = engine_mode(contract.get("precision", "fp32"), precision, calib_images is not None,
                           cache_file.is_file()) == "explicit"
    trt = import_tensorrt()
    device = current_device()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # explicit batch is the only mode in TensorRT 10; a Q/DQ graph is built strongly typed, its types decide
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if explicit else 0
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
    profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8") and not explicit:  # strongly typed networks take no precision flags
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8" and not explicit:
        config.set_flag(trt.BuilderFlag.INT8)
        batches: Iterator[np.ndarray] = (calibration_batches(calib_images, contract, calib_batch_size, calib_limit)
                                         if calib_images is not None else iter(()))
        config.int8_calibrator = _make_calibrator(trt, batches, calib_batch_size, cache_file, calib_algorithm)
        calib_profile = builder.create_optimization_profile()
        calib_shape = [int(calib_batch_size), *rest]
        calib_profile.set_shape(name, calib_shape, calib_shape, calib_shape)
        config.set_calibration_profile(calib_profile)

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
                            "see the TensorRT log above, or try another precision or a larger workspace")
    engine_path = out_dir / f"model.{precision}.engine"
    sidecar = engine_sidecar(device, precision, shapes, sha256_file(onnx_path), contract, round(seconds, 1),
                             workspace_gb)
    atomic_write_bytes(engine_path, bytes(serialized))
    sidecar["engine_sha256"] = sha256_file(engine_path)
    atomic_write_json(sidecar_path(engine_path), sidecar)
    if cache is not None:
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
        trt = import_tensorrt()
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
        self._out_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self._out))
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


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if dtype not in table:
        raise ArtifactError(f"unexpected engine output dtype {dtype}; rebuild the engine from a ctxsim ONNX file")
    return table[dtype]

