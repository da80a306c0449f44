"""Runners for exported artifacts: ``open_runner(path)`` -> an ONNX Runtime session or a TensorRT engine runner;
``resolve_artifact(path)``, the one place a model path becomes a kind (run folder, ONNX file, TensorRT engine).

Every runner has ``.run(batch: np.ndarray) -> np.ndarray [N, D] float32``, ``.contract`` (the preprocessing
contract dict, see ``ctxsim.export.contract``) and ``.name`` (e.g. ``"onnxruntime:CPUExecutionProvider"``,
``"tensorrt"``). Batches are the output of ``ctxsim.export.contract.preprocess_batch``.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ctxsim.errors import ArtifactError, ConfigError, MissingDependency
from ctxsim.export.contract import check_batch, contract_from_metadata

log = logging.getLogger(__name__)

#: ONNX Runtime execution providers in order of preference (those not installed are skipped)
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
#: what runs each kind of artifact: a run folder (PyTorch), an ONNX file, a TensorRT engine
ARTIFACT_KINDS = ("torch", "onnx", "tensorrt")


class Runner(Protocol):
    name: str
    contract: dict[str, Any]

    def run(self, batch: np.ndarray) -> np.ndarray: ...


#: One ONNX Runtime, chosen by extra: both wheels install the same ``onnxruntime`` module (docs/JETSON.md)
ORT_MISSING = ("ONNX Runtime is not installed: pip install 'ctxsim[cpu]' (CPU) or 'ctxsim[gpu]' (CUDA server); "
               "on a Jetson, NVIDIA's onnxruntime-gpu wheel (docs/JETSON.md)")


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or MissingDependency naming the extras when neither wheel is installed."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependency(ORT_MISSING) from None
    return onnxruntime


def install_problem(distributions: set[str], available: Sequence[str]) -> str | None:
    """What is wrong with this ONNX Runtime install, if anything. The CPU wheel (``onnxruntime``) and the GPU
    wheel (``onnxruntime-gpu``) install the same ``onnxruntime`` module; with both, whichever came last wins, and
    a GPU server quietly runs on the CPU."""
    gpu = {d for d in distributions if d.startswith(("onnxruntime-gpu", "onnxruntime_gpu"))}
    if gpu and "CUDAExecutionProvider" not in available:
        both = " and the CPU wheel onnxruntime" if "onnxruntime" in distributions else ""
        return (f"{sorted(gpu)[0]} is installed{both}, but ONNX Runtime offers no CUDAExecutionProvider; keep one "
                "ONNX Runtime: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    return None


@functools.cache
def _warn_install_problem(available: tuple[str, ...]) -> None:
    """Scan the installed distributions once per process (not per session opened) and warn if ONNX Runtime's
    install is broken (see :func:`install_problem`)."""
    import importlib.metadata as md

    names = {(d.metadata["Name"] or "").lower() for d in md.distributions()
             if (d.metadata["Name"] or "").lower().startswith("onnxruntime")}
    problem = install_problem(names, available)
    if problem:
        log.warning(problem)


def default_providers(available: Sequence[str] | None = None) -> list[str]:
    """The preferred ONNX Runtime providers that are installed: TensorRT EP, CUDA EP, then CPU (with a warning,
    once, when a GPU build is installed but shadowed: see :func:`install_problem`)."""
    if available is None:
        ort = import_onnxruntime()
        available = ort.get_available_providers()
        _warn_install_problem(tuple(available))
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen or list(available)


class OnnxRunner:
    """An ONNX Runtime session over a ctxsim ONNX file."""

    def __init__(self, path: str | Path, providers: Sequence[str | tuple[str, dict]] | None = None,
                 intra_op_threads: int = 0, session_config: dict[str, Any] | None = None):
        """``session_config``: ``SessionOptions`` attributes (``intra_op_num_threads``, ...) and session config
        entries (keys with a dot, e.g. ``session.intra_op.allow_spinning``), e.g. ctxsim.deploy's thread policy."""
        ort = import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path} not found")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(intra_op_threads)
        opts.log_severity_level = 3
        for key, value in (session_config or {}).items():
            if "." in key:
                opts.add_session_config_entry(key, str(value))
            else:
                setattr(opts, key, value)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=list(providers) if providers else default_providers())
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{self.path} is not a loadable ONNX model ({first}); "
                                "re-export it with `ctxsim export`") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.contract: dict[str, Any] = contract_from_metadata(meta, str(self.path))
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if names_in != [self.contract["input_name"]] or names_out[:1] != [self.contract["output_name"]]:
            raise ArtifactError(f"{self.path} has inputs {names_in} / outputs {names_out}, not the ones its "
                                "contract names; re-export it with `ctxsim export`")
        self.providers = self.session.get_providers()
        self.name = f"onnxruntime:{self.providers[0]}"

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Embed one preprocessed batch: [N, D] float32, L2-normalised."""
        x = check_batch(batch, self.contract, str(self.path.name))
        if len(x) == 0:
            return np.zeros((0, self.contract["embedding_dim"]), np.float32)
        out = self.session.run([self.contract["output_name"]], {self.contract["input_name"]: x})[0]
        return np.ascontiguousarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        return f"OnnxRunner({str(self.path)!r}, {self.name})"


def suffix_kind(path: str | Path) -> str | None:
    """"onnx" or "tensorrt" by the file name's suffix (any case), else None."""
    suffix = Path(path).suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    return None


def resolve_artifact(path: str | Path) -> tuple[str, Path]:
    """(kind, the path to open) for a model artifact, kind one of :data:`ARTIFACT_KINDS`: a run folder (or its
    model.json) -> "torch"; an export folder -> "onnx" and its model.onnx; a ``.onnx`` file -> "onnx"; a
    ``.engine`` / ``.plan`` / ``.trt`` file -> "tensorrt". ArtifactError for a missing path or anything else."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "model.json").exists():
            return "torch", p
        if (p / "model.onnx").exists():
            return "onnx", p / "model.onnx"
        raise ArtifactError(f"{p} is neither a run folder (model.json) nor an export folder (it holds no "
                            "model.onnx); export a run there with `ctxsim export`, or pass a .onnx or engine file")
    if not p.exists():
        raise ArtifactError(f"model artifact not found: {p}")
    kind = suffix_kind(p)
    if kind is not None:
        return kind, p
    if p.name == "model.json":
        return "torch", p.parent
    raise ArtifactError(f"{p} is not a model artifact ctxsim can run (expected .onnx, .engine, .plan or .trt, or a "
                        "run folder)")


def open_runner(path: str | Path, providers: Sequence[str | tuple[str, dict]] | None = None,
                device: str | None = None, session_config: dict[str, Any] | None = None) -> Runner:
    """An exported artifact's runner (see :func:`resolve_artifact`): ONNX -> :class:`OnnxRunner`, TensorRT engine
    -> ``TensorRTRunner``. ``providers`` (ONNX only) are ONNX Runtime's; else ``device="cpu"`` keeps an ONNX model
    on the CPU provider and any other device takes :func:`default_providers`. A TensorRT engine runs on the current
    CUDA device. ``session_config``: ONNX Runtime session settings (see :class:`OnnxRunner`; ignored for engines)."""
    kind, path = resolve_artifact(path)
    if kind == "torch":  # a run folder runs in PyTorch; one exported into itself holds a model.onnx too
        if not (path / "model.onnx").is_file():
            raise ArtifactError(f"{path} is a run folder, not an exported artifact; export it with `ctxsim export`")
        kind, path = "onnx", path / "model.onnx"
    if kind == "onnx":
        if not providers and device == "cpu":
            providers = ["CPUExecutionProvider"]
        return OnnxRunner(path, providers, session_config=session_config)
    if providers:
        raise ConfigError("providers apply to ONNX models only, not to TensorRT engines")
    from ctxsim.export.tensorrt import TensorRTRunner

    return TensorRTRunner(path)


def artifact_contract(path: str | Path) -> dict[str, Any]:
    """An artifact's contract without opening a session: ONNX metadata, or an engine's sidecar JSON."""
    path = Path(path)
    if suffix_kind(path) == "tensorrt":
        from ctxsim.export.tensorrt import read_sidecar

        return read_sidecar(path)["contract"]
    from ctxsim.export.onnx_export import read_onnx_contract

    return read_onnx_contract(path)
