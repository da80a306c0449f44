"""``export_run``: the whole export stage in one call (ONNX, fp16 ONNX, TensorRT engine, parity, Triton, manifest)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ctxsim.errors import ConfigError
from ctxsim.export.onnx_export import DEFAULT_OPSET, ExportResult, export_onnx
from ctxsim.io import sha256_file

__all__ = ["export_run"]

log = logging.getLogger(__name__)


def export_run(run_dir: str | Path, out_dir: str | Path, fp16: bool = True, int8: bool = False, simplify: bool = False,
               input_format: str = "float_nchw", opset: int | None = DEFAULT_OPSET, trt: bool = False,
               precision: str = "fp16", calib_images: str | Path | None = None, min_batch: int = 1,
               opt_batch: int = 16, max_batch: int = 64, workspace_gb: float = 2.0,
               timing_cache: str | Path | None = None, triton: bool | str | Path | None = None,
               triton_instances: int = 1, parity: bool = True, parity_limit: int | None = None,
               data_root: str | None = None, thresholds: str | Mapping[str, Any] | None = None,
               progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Export a run folder and check the artifacts, in order:

    1. ``model.onnx`` (+ ``model.fp16.onnx`` with ``fp16``; + ``model.int8.onnx`` with ``int8``: ONNX Runtime
       static quantisation calibrated on ``calib_images`` or the run's training images), contract in the metadata;
    2. with ``trt``: ``model.<precision>.engine`` + sidecar, a strongly typed engine built from the ONNX file of
       that precision (fp32 model.onnx, fp16 model.fp16.onnx, int8 model.int8.onnx, which ``trt`` with int8
       writes even without ``int8``); needs TensorRT 10 or 11 and a GPU;
    3. with ``parity``: each artifact against the PyTorch fp32 model on the run's evaluation images
       (``parity_limit`` images at most), reports merged into ``parity.json``;
    4. with ``triton`` (True: ``out_dir/triton``, or a folder): a Triton model repository;
    5. ``manifest.json`` binding it all to the model fingerprint.

    The folder is published as one unit (``ctxsim.export.publish``): everything is built in a staging folder inside
    ``out_dir`` and moved into place with manifest.json last, so a failure or a kill midway leaves the previous
    export as it was (or, killed while moving, a mismatch every reader refuses), never new files under old verdicts.

    Parity failures do not raise: check ``result.passed`` / ``result.parity[name].failures``.
    ``progress(done, total)`` is called after each step; step names go to this module's logger.
    """
    final_dir = Path(out_dir)
    if trt and precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    if final_dir.resolve() == Path(run_dir).resolve():
        raise ConfigError("export into a folder of its own, not the run folder (e.g. RUN_DIR/export)")
    steps = ["onnx"] + (["engine"] if trt else []) + (["parity"] if parity else []) + \
            (["triton"] if triton else []) + ["manifest"]
    done = 0

    def step(name: str) -> None:
        nonlocal done
        done += 1
        log.info("export step %d/%d done: %s", done, len(steps), name)
        if progress is not None:
            progress(done, len(steps))

    if trt:  # fail before writing anything when TensorRT cannot run here
        from ctxsim.export.tensorrt import current_device

        current_device()
    # an engine is strongly typed: its precision comes from the ONNX file it is built from
    fp16 = fp16 or (trt and precision == "fp16")
    int8 = int8 or (trt and precision == "int8")
    from ctxsim.export.publish import staged_export

    with staged_export(final_dir) as out_dir:  # built here, published into final_dir as one unit on success
        result = _export_staged(
            run_dir=run_dir, out_dir=out_dir, final_dir=final_dir, fp16=fp16, int8=int8, simplify=simplify,
            input_format=input_format, opset=opset, trt=trt, precision=precision, calib_images=calib_images,
            min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace_gb=workspace_gb,
            timing_cache=timing_cache, triton=triton, triton_instances=triton_instances, parity=parity,
            parity_limit=parity_limit, data_root=data_root, thresholds=thresholds, step=step)
    result = _relocate(result, out_dir, final_dir)
    step("manifest")
    return result


def _export_staged(*, run_dir, out_dir, final_dir, fp16, int8, simplify, input_format, opset, trt, precision,
                   calib_images, min_batch, opt_batch, max_batch, workspace_gb, timing_cache, triton,
                   triton_instances, parity, parity_limit, data_root, thresholds, step) -> ExportResult:
    """Steps 1-5 of :func:`export_run` into the staging folder ``out_dir`` (published later into ``final_dir``)."""
    result = export_onnx(run_dir, out_dir, opset=opset, fp16=fp16, simplify=simplify, input_format=input_format)
    if int8:
        from ctxsim.export.quantize import calibration_batches, image_batches, quantize_onnx, run_calibration_images

        batches = (calibration_batches(calib_images, result.contract, 32, 256) if calib_images is not None
                   else image_batches(run_calibration_images(run_dir, 256, data_root), result.contract))
        result.int8_path = quantize_onnx(result.onnx_path, batches)
        result.sha256[result.int8_path.name] = sha256_file(result.int8_path)
    step("onnx")

    if trt:
        from ctxsim.export.tensorrt import build_engine

        source = {"fp32": result.onnx_path, "fp16": result.fp16_path, "int8": result.int8_path}[precision]
        assert source is not None  # written above: fp16/int8 are forced on for their engines
        build = build_engine(source, out_dir, precision=precision, min_batch=min_batch, opt_batch=opt_batch,
                             max_batch=max_batch, workspace_gb=workspace_gb, timing_cache=timing_cache)
        result.engine_path, result.engine_sidecar = build.path, build.sidecar
        result.sha256[build.path.name] = build.sidecar.get("engine_sha256", "")
        step("engine")

    if parity:
        from ctxsim.export.parity import check_parity, write_parity

        for artifact in result.artifacts():
            report = check_parity(run_dir, artifact, data_root=data_root, thresholds=thresholds, limit=parity_limit,
                                  write=False)
            report.artifact = str(final_dir / artifact.name)  # where it is published
            write_parity(artifact, report)
            result.parity[artifact.name] = report
        step("parity")

    if triton:
        from ctxsim.export.triton import write_triton_repository

        triton_dir = out_dir / "triton" if triton is True else Path(triton)
        if triton is not True and triton_dir.resolve().is_relative_to(final_dir.resolve()):
            triton_dir = out_dir / triton_dir.resolve().relative_to(final_dir.resolve())  # staged with the rest
        result.triton_dir = write_triton_repository(triton_dir, result.onnx_path, result.engine_path,
                                                    max_batch_size=max_batch, instances=triton_instances)
        step("triton")

    from ctxsim.export.manifest import write_manifest

    result.manifest_path = write_manifest(out_dir, result.contract, result.artifacts(), result.parity,
                                          run_dir=run_dir, triton_dir=result.triton_dir)
    return result


def _relocate(result: ExportResult, stage: Path, final_dir: Path) -> ExportResult:
    """The result's paths in the staging folder -> where they were published."""
    def moved(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = Path(p)
        return final_dir / p.relative_to(stage) if p.is_relative_to(stage) else p

    result.out_dir = final_dir
    result.onnx_path = moved(result.onnx_path)  # type: ignore[assignment]
    result.fp16_path, result.int8_path = moved(result.fp16_path), moved(result.int8_path)
    result.engine_path, result.triton_dir = moved(result.engine_path), moved(result.triton_dir)
    result.manifest_path = moved(result.manifest_path)
    return result
