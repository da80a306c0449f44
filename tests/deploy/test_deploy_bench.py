"""The benchmark table, on a few Omniglot evaluation classes."""
from __future__ import annotations

import json

import pytest


def test_bench_table(tmp_path, run_dir):
    from ctxsim.deploy import bench

    report = bench(run_dir, backends=("torch", "onnx", "tensorrt"), batches=(1, 16), limit=200,
                   out_dir=tmp_path, time_budget_s=0.2)
    rows = {(r.backend, r.precision): r for r in report.rows}
    assert set(rows) == {(b, p) for b in ("torch", "onnx", "tensorrt") for p in ("fp32", "fp16")}
    ref = rows[("torch", "fp32")]
    assert ref.status == "ok" and ref.delta_r_at_1 == 0.0 and 0 < ref.r_at_1 < 1 and 0 < ref.map_at_r < 1
    assert ref.latency_p50_ms > 0 and ref.latency_p99_ms >= ref.latency_p50_ms and ref.throughput_ips > 0
    assert ref.batch == 16 and ref.size_mb > 0
    import torch

    if not torch.cuda.is_available():
        assert rows[("torch", "fp16")].status == "skipped: fp16 needs CUDA"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert rows[("tensorrt", "fp32")].status == "skipped: TensorRT not installed"
        assert rows[("tensorrt", "fp16")].status == "skipped: TensorRT not installed"
    onnx = rows[("onnx", "fp32")]
    if onnx.status.startswith("failed: MissingDependency"):
        pytest.skip(f"ONNX export not available: {onnx.status}")
    assert onnx.status == "ok", onnx.status
    assert abs(onnx.delta_r_at_1) <= 0.01 and onnx.runner.startswith("onnxruntime")
    assert report.images == 200 and report.classes == 10
    search = {s.index_type: s for s in report.search}
    assert set(search) == {"flat", "ivf", "ivfpq", "hnsw", "torch"}
    for s in search.values():
        assert s.status == "ok", s.status
        assert s.qps_batch > 0 and s.qps_single > 0 and 0 < s.recall_at_10 <= 1
    assert search["flat"].recall_at_10 == pytest.approx(1.0) and search["torch"].recall_at_10 == pytest.approx(1.0)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["machine"]["cores"] >= 1 and len(data["rows"]) == 6
    md = (tmp_path / "bench.md").read_text()
    assert "| backend | precision |" in md and "TensorRT" in md and data["machine"]["cpu"] in md


def test_bench_int8_onnx_row_is_the_quantised_model(tmp_path, run_dir):
    from ctxsim.deploy import bench

    report = bench(run_dir, backends=("torch", "onnx"), precisions=("fp32", "int8"), batches=(1, 8), limit=200,
                   out_dir=tmp_path, index_types=("flat",), time_budget_s=0.2)
    rows = {(r.backend, r.precision): r for r in report.rows}
    assert rows[("torch", "int8")].status == "skipped: int8 is for ONNX Runtime and TensorRT"
    q = rows[("onnx", "int8")]
    assert q.status == "ok", q.status
    assert q.artifact.endswith("model.int8.onnx") and q.runner.startswith("onnxruntime")
    assert q.size_mb < rows[("onnx", "fp32")].size_mb  # int8 weights: a smaller file than fp32's


def test_an_export_that_writes_nothing_is_artifact_error(tmp_path, monkeypatch):
    import importlib
    from types import SimpleNamespace

    from ctxsim.errors import ArtifactError

    bench_module = importlib.import_module("ctxsim.deploy.bench")  # the module (ctxsim.deploy.bench is the function)

    monkeypatch.setattr(bench_module, "_export_onnx_fn", lambda: lambda *a, **k: SimpleNamespace(onnx_path=None))
    with pytest.raises(ArtifactError, match="wrote no model.onnx"):
        bench_module._onnx_artifact(tmp_path / "run", "fp32", tmp_path / "tmp")
