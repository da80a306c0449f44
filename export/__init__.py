"""Stage 2: export to ONNX / TensorRT / Triton and check retrieval parity against the PyTorch reference.

Public API (see docs/EXPORT.md): ``export_run``, ``export_onnx``, ``check_parity``, ``assert_parity``,
``raise_if_failed``, ``open_runner``, ``resolve_artifact``, ``preprocess_batch``, ``build_engine``,
``check_engine_compatible``, ``write_triton_repository``, ``write_manifest``, ``check_artifact`` (an artifact against
the manifest beside it), ``verify_export``.
TensorRT is imported only when an engine is built or run.
"""
from ctxsim.export.api import export_run
from ctxsim.export.contract import build_contract, preprocess_batch
from ctxsim.export.manifest import check_artifact, read_manifest, verify_manifest, write_manifest
from ctxsim.export.onnx_export import ExportResult, export_onnx, read_onnx_contract
from ctxsim.export.parity import (
    DEFAULT_THRESHOLDS,
    ParityReport,
    assert_parity,
    check_parity,
    parse_thresholds,
    raise_if_failed,
)
from ctxsim.export.quantize import quantize_onnx
from ctxsim.export.runners import OnnxRunner, open_runner, resolve_artifact
from ctxsim.export.tensorrt import build_engine, check_engine_compatible
from ctxsim.export.triton import parse_pbtxt, write_triton_repository
from ctxsim.export.verify import verify_export

__all__ = [
    "DEFAULT_THRESHOLDS", "ExportResult", "OnnxRunner", "ParityReport", "assert_parity", "build_contract",
    "build_engine", "check_artifact", "check_engine_compatible", "check_parity", "export_onnx", "export_run",
    "open_runner", "parse_pbtxt", "parse_thresholds", "preprocess_batch", "quantize_onnx", "raise_if_failed",
    "read_manifest", "read_onnx_contract", "resolve_artifact", "verify_export", "verify_manifest", "write_manifest",
    "write_triton_repository",
]
