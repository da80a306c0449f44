"""`ctxsim export` and `ctxsim parity`: thin commands over ctxsim.export (wired into the app by ``register``)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ctxsim.cli.console import console, progress_callback

__all__ = ["parity_table", "register"]


def parity_table(reports: dict) -> Table:
    """One row per artifact: verdict, cosine, ΔR@1, R@1 flips (of them near-ties), ΔMAP@R, neighbour overlap,
    cross-model R@1."""
    table = Table(title="parity against the PyTorch fp32 model")
    for col in ("artifact", "precision", "images", "verdict", "min cos", "p1 cos", "R@1 ref", "ΔR@1 pts",
                "R@1 flips (ties)", "ΔMAP@R pts", "kNN Jaccard", "cross R@1"):
        table.add_column(col, justify="left" if col in ("artifact", "verdict") else "right")
    for name, r in reports.items():
        d = r.to_dict()
        delta = d["retrieval"].get("delta_points") or {}
        ties = d["retrieval"].get("ties")
        flips = f"{ties['flips']} ({ties['flips_near_tied']})" if ties else "-"
        table.add_row(
            name, d["precision"], str(d["images"]), "[green]pass[/green]" if d["passed"] else "[red]FAIL[/red]",
            _f(d["embedding"].get("cosine_min"), 6), _f(d["embedding"].get("cosine_p1"), 6),
            _f(d["retrieval"]["reference"].get("R@1"), 4), _f(delta.get("R@1"), 2), flips, _f(delta.get("MAP@R"), 2),
            _f(d["neighbours"].get("jaccard_mean"), 4), _f(d["cross"].get("R@1"), 4))
    return table


def _f(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def register(app: typer.Typer) -> None:
    """Add the `export` and `parity` commands to ``app``."""

    @app.command("export", epilog="Example: ctxsim export runs/omni --trt --precision int8 --triton --limit 2000")
    def export_cmd(
        run_dir: Path = typer.Argument(..., help="A run folder from `ctxsim train`."),
        out: Path | None = typer.Option(None, help="Export folder (default: RUN_DIR/export)."),
        fp16: bool = typer.Option(True, "--fp16/--no-fp16", help="Also write model.fp16.onnx."),
        int8: bool = typer.Option(False, "--int8", help="Also write model.int8.onnx (ONNX Runtime static "
                                                        "quantisation, QDQ; calibrated on --calib or the run's "
                                                        "training images)."),
        simplify: bool = typer.Option(False, help="Simplify the graphs with onnxslim."),
        input_format: str = typer.Option("float_nchw", help="float_nchw, or uint8_nhwc (normalisation in the graph)."),
        opset: int = typer.Option(17, help="ONNX opset."),
        trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT engine (TensorRT 10 or 11 and a GPU; "
                                                      "strongly typed, from the ONNX file of --precision)."),
        precision: str = typer.Option("fp16", help="TensorRT engine precision: fp32 (model.onnx), fp16 "
                                                   "(model.fp16.onnx) or int8 (model.int8.onnx, implies --int8)."),
        calib: Path | None = typer.Option(None, help="Folder of calibration images for model.int8.onnx (default: "
                                                     "the run's training images)."),
        max_batch: int = typer.Option(64, help="Largest batch of the engine profile and of Triton."),
        workspace_gb: float = typer.Option(2.0, help="TensorRT builder workspace (GiB)."),
        timing_cache: Path | None = typer.Option(None, help="TensorRT timing cache file (read and updated)."),
        triton: bool = typer.Option(False, "--triton", help="Write a Triton model repository to OUT/triton."),
        parity: bool = typer.Option(True, "--parity/--no-parity", help="Check parity on evaluation images."),
        limit: int | None = typer.Option(None, help="At most this many evaluation images for parity."),
        data: str | None = typer.Option(None, help="Dataset root, if it moved since training."),
        thresholds: str | None = typer.Option(None, help="Override parity thresholds: key=value,..."),
    ) -> None:
        """Export a run to ONNX (+fp16, +int8, +TensorRT), check parity, write Triton repository and manifest.json.

        Exits 1 when a parity check fails (the artifacts are written and the report is in parity.json)."""
        from ctxsim.export import export_run, raise_if_failed

        out_dir = out or run_dir / "export"
        with progress_callback("export") as progress:
            result = export_run(run_dir, out_dir, fp16=fp16, int8=int8, simplify=simplify, input_format=input_format,
                                opset=opset, trt=trt, precision=precision, calib_images=calib, max_batch=max_batch,
                                workspace_gb=workspace_gb, timing_cache=timing_cache, triton=triton, parity=parity,
                                parity_limit=limit, data_root=data, thresholds=thresholds, progress=progress)
        for path in result.artifacts():
            console.print(f"wrote {path}  sha256 {result.sha256.get(path.name, '')[:16]}")
        if result.triton_dir:
            console.print(f"Triton repository: {result.triton_dir}")
        console.print(f"manifest: {result.manifest_path}  (model {result.fingerprint})")
        if result.parity:
            console.print(parity_table(result.parity))
            raise_if_failed(result.parity)  # ParityFailed: main() prints it and exits 1

    @app.command("parity",
                 epilog="Example: ctxsim parity runs/omni --artifact runs/omni/export/model.fp16.onnx --limit 2000")
    def parity_cmd(
        run_dir: Path = typer.Argument(..., help="The run folder the artifact was exported from."),
        artifact: Path = typer.Option(..., help="model.onnx, model.fp16.onnx or model.<precision>.engine."),
        data: str | None = typer.Option(None, help="Dataset root, if it moved since training."),
        limit: int | None = typer.Option(None, help="At most this many evaluation images."),
        precision: str | None = typer.Option(None, help="Thresholds of fp32/fp16/int8 (default: the artifact's)."),
        thresholds: str | None = typer.Option(None, help="Override thresholds: key=value,... (value none: off)."),
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
        flips_grid: Path | None = typer.Option(None, help="Draw the queries whose top-1 flipped into this PNG."),
    ) -> None:
        """Compare an artifact with the run's PyTorch model on real evaluation images; writes parity.json.

        Exits 1 when a threshold fails."""
        import json

        from ctxsim.export import check_parity, raise_if_failed

        with progress_callback("embedding") as progress:
            report = check_parity(run_dir, artifact, data_root=data, thresholds=thresholds, limit=limit,
                                  precision=precision, progress=progress, flips_grid=flips_grid)
        if json_out:
            console.print_json(json.dumps(report.to_dict()))
        else:
            console.print(parity_table({artifact.name: report}))
        ties = report.retrieval.get("ties") or {}
        if flips_grid is not None:
            console.print(f"flips: {flips_grid} ({len(ties['examples'])} queries)" if ties.get("examples")
                          else "flips: none, no grid written")
        raise_if_failed({artifact.name: report})
