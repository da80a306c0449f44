"""int8 ONNX by post-training static quantisation with ONNX Runtime: ``model.onnx`` -> ``model.int8.onnx``.

The result is a QDQ graph (QuantizeLinear/DequantizeLinear pairs around the quantised operators), int8 weights
per output channel and int8 activations, both symmetric (zero points 0), biases in float: the form ONNX Runtime
runs on CPUs and the form TensorRT 10 and 11 build strongly typed int8 engines from (explicit quantisation), so
the calibration can happen on a workstation and the file travel to a Jetson. Calibration images are real ones:
a folder (``calib_images``, read by ``calibration_batches``) or, by default, images of the run's own *training*
classes, never the evaluation split that parity then measures on. ``check_parity`` judges the file at the int8
thresholds; a calibration method that ruins a model is caught there (see docs/EXPORT.md for one that does).
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ctxsim.errors import ConfigError, MissingDependency
from ctxsim.io import atomic_path

__all__ = ["CALIBRATION_METHODS", "IMAGE_EXTENSIONS", "ONNX_INT8_NAME", "calibration_batches", "image_batches",
           "list_images", "quantize_onnx", "run_calibration_images"]

log = logging.getLogger(__name__)

ONNX_INT8_NAME = "model.int8.onnx"
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def run_calibration_images(run_dir: str | Path, limit: int = 256, data_root: str | None = None,
                           seed: int = 0) -> list[Any]:
    """``limit`` images (PIL) drawn at random from the run's training split: its training classes only."""
    from ctxsim.data.pipeline import build_datasets
    from ctxsim.runs import run_config

    train = build_datasets(run_config(run_dir, data_root)).train.with_transform(None)
    pick = np.random.default_rng(seed).choice(len(train), size=min(int(limit), len(train)), replace=False)
    return [train.load_image(int(i)) for i in sorted(pick)]


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
    """Full batches of real images from ``folder`` through ``preprocess_batch`` (a short last batch is dropped,
    so every calibration batch has the same shape)."""
    from ctxsim.data.images import open_image
    from ctxsim.export.contract import preprocess_batch

    files = list_images(folder, limit)
    if len(files) < batch_size:
        raise ConfigError(f"{len(files)} calibration images under {folder}, fewer than one batch of {batch_size}")
    for start in range(0, len(files) - batch_size + 1, batch_size):
        yield preprocess_batch([open_image(p) for p in files[start:start + batch_size]], contract)


def image_batches(images: list[Any], contract: dict[str, Any], batch_size: int = 32) -> Iterator[np.ndarray]:
    """Images through the artifact's own preprocessing (``preprocess_batch``), in batches."""
    from ctxsim.export.contract import preprocess_batch

    for start in range(0, len(images), batch_size):
        yield preprocess_batch(images[start:start + batch_size], contract)


def quantize_onnx(onnx_path: str | Path, batches: Iterable[np.ndarray], out_path: str | Path | None = None,
                  method: str = "minmax") -> Path:
    """Write an int8 QDQ copy of a ctxsim fp32 ONNX file (default: ``model.int8.onnx`` beside it), calibrated on
    ``batches`` (preprocessed input arrays); its contract says precision "int8" and keeps the fingerprint."""
    import onnx

    from ctxsim.export.contract import contract_to_metadata
    from ctxsim.export.onnx_export import read_onnx_contract

    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise MissingDependency(f"int8 ONNX needs onnxruntime's quantization tools ({e})") from None
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    src = Path(onnx_path)
    contract = read_onnx_contract(src)
    if contract.get("precision", "fp32") != "fp32":
        raise ConfigError(f"{src.name} is {contract['precision']}; quantise the fp32 model.onnx")
    out = Path(out_path) if out_path is not None else src.parent / ONNX_INT8_NAME
    feeds = [{contract["input_name"]: np.ascontiguousarray(b)} for b in batches]
    if not feeds:
        raise ConfigError("no calibration batches: give at least one batch of real images")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:  # ONNX Runtime's signature
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        quant_pre_process(str(src), str(pre))  # shape inference and graph fusions first, as ORT advises
        quantize_static(str(pre), str(q), _Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                          "percentile": CalibrationMethod.Percentile}[method],
                        # symmetric: every zero point is 0, as TensorRT requires; biases stay float: ONNX
                        # Runtime's default int32 bias (a DequantizeLinear of an INT32 tensor) is not in
                        # onnx-tensorrt's support matrix, and TensorRT fuses a float bias into the int8 conv
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QuantizeBias": False})
        proto = onnx.load(str(q))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, contract_to_metadata({**contract, "precision": "int8"}))
    with atomic_path(out) as tmp_out:
        onnx.save(proto, str(tmp_out))
    n_q = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    log.info("wrote %s (%d quantised tensors, %s calibration on %d batches)", out, n_q, method, len(feeds))
    return out
