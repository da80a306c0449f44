"""One benchmark table per machine: backend x precision (speed, size, retrieval accuracy) and index type (QPS, recall).

``bench(run_dir)``: for each backend (torch, onnx, tensorrt) and precision, a status (ok, skipped: reason,
failed: reason), the artifact's size, p50/p99 latency of one preprocessed image (the runner only), throughput at
the largest batch, and R@1 / MAP@R on the run's evaluation split through the full Embedder with ΔR@1 against
PyTorch fp32; for each index type, QPS (batched and one query at a time) and recall@10 against exact search over
the reference embeddings. Artifacts come from ``run_dir/export`` when present, else are exported (or, with
TensorRT and a GPU, built) into a temporary folder. Written atomically as ``bench.json`` and ``bench.md``; the
tables per machine: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctxsim.errors import ArtifactError, ConfigError, MissingDependency
from ctxsim.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from ctxsim.deploy.index import Index

__all__ = ["BackendRow", "BenchReport", "SearchRow", "bench", "machine_info", "markdown_table"]

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16")


@dataclass
class BackendRow:
    backend: str
    precision: str
    status: str                      # "ok" | "skipped: ..." | "failed: ..."
    artifact: str | None = None
    runner: str | None = None
    size_mb: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    batch: int | None = None
    throughput_ips: float | None = None
    r_at_1: float | None = None
    map_at_r: float | None = None
    delta_r_at_1: float | None = None


@dataclass
class SearchRow:
    index_type: str
    status: str
    params: dict = field(default_factory=dict)
    build_s: float | None = None
    qps_batch: float | None = None
    qps_single: float | None = None
    recall_at_10: float | None = None


@dataclass
class BenchReport:
    machine: dict
    run_dir: str
    fingerprint: str
    dataset: str
    images: int
    classes: int
    rows: list[BackendRow] = field(default_factory=list)
    search: list[SearchRow] = field(default_factory=list)
    created: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        m = self.machine
        lines = [f"# ctxsim bench: {Path(self.run_dir).name} ({self.fingerprint})", "",
                 f"Machine: {m.get('cpu')} ({m.get('cores')} cores), GPU: {m.get('gpu') or 'none'}; "
                 f"{m.get('os')}; torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')}, "
                 f"faiss {m.get('faiss')}, TensorRT {m.get('tensorrt') or 'not installed'}.", "",
                 f"Data: {self.dataset} evaluation split, {self.images} images, {self.classes} classes "
                 f"(leave-one-out retrieval). Created {self.created}.", "",
                 "## Embedding backends", "",
                 markdown_table(["backend", "precision", "status", "size MB", "p50 ms (b=1)", "p99 ms (b=1)",
                                 "img/s (batch)", "R@1", "MAP@R", "ΔR@1"],
                                [[r.backend, r.precision, r.status, _f(r.size_mb, 2), _f(r.latency_p50_ms, 2),
                                  _f(r.latency_p99_ms, 2),
                                  "-" if r.throughput_ips is None else f"{r.throughput_ips:,.0f} ({r.batch})",
                                  _f(r.r_at_1, 4), _f(r.map_at_r, 4), _f(r.delta_r_at_1, 4, signed=True)]
                                 for r in self.rows]), "",
                 "Latency and throughput time the runner on preprocessed input; accuracy embeds the decoded images "
                 "through each backend's own recorded preprocessing.", "",
                 "## Index types (reference embeddings)", "",
                 markdown_table(["index", "status", "params", "build s", "QPS (batch)", "QPS (single)", "recall@10"],
                                [[s.index_type, s.status, _params(s.params), _f(s.build_s, 2), _f(s.qps_batch, 0),
                                  _f(s.qps_single, 0), _f(s.recall_at_10, 4)] for s in self.search]), ""]
        return "\n".join(lines)

    def save(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        out = Path(out_dir)
        atomic_write_json(out / "bench.json", self.to_dict())
        atomic_write_text(out / "bench.md", self.to_markdown())
        return out / "bench.json", out / "bench.md"


def _f(v: float | None, digits: int, signed: bool = False) -> str:
    if v is None:
        return "-"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _params(p: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in p.items() if k != "trained_on") or "-"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_info() -> dict:
    """CPU model, core count, GPU, OS and library versions: the header of every benchmark table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
                            "python": platform.python_version(), "arch": platform.machine()}
    try:
        cores = len(os.sched_getaffinity(0))
        info["cores"] = cores
    except (AttributeError, OSError):
        pass
    import torch

    info["torch"] = torch.__version__
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    for mod in ("onnxruntime", "faiss", "tensorrt"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:200]


def _one_by_one(index: Index, queries: np.ndarray, k: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """Search ``queries`` one at a time (what a server without batching does)."""
    return [index.search(queries[i:i + 1], k) for i in range(len(queries))]


def _timeit(fn: Callable[[], Any], min_reps: int, max_reps: int, budget_s: float) -> list[float]:
    fn()  # warm-up
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------- artifacts
def _export_onnx_fn() -> Callable[..., Any]:
    try:
        from ctxsim.export import export_onnx
    except ImportError:
        try:
            from ctxsim.export.onnx_export import export_onnx
        except ImportError:
            raise MissingDependency("ctxsim.export.export_onnx is not available") from None
    return export_onnx


def _onnx_artifact(run_dir: Path, precision: str, tmp: Path) -> Path:
    """run_dir/export/model[.fp16|.int8].onnx if present, else exported (fp32 and fp16 together) into ``tmp``;
    int8 is quantised from model.onnx, calibrated on the run's training images."""
    name = {"fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}.get(precision, "model.onnx")
    for folder in (run_dir / "export", tmp / "onnx"):
        if (folder / name).exists():
            return folder / name
    if precision == "int8":
        from ctxsim.export.onnx_export import read_onnx_contract
        from ctxsim.export.quantize import image_batches, quantize_onnx, run_calibration_images

        fp32 = _onnx_artifact(run_dir, "fp32", tmp)
        batches = image_batches(run_calibration_images(run_dir), read_onnx_contract(fp32))
        return quantize_onnx(fp32, batches, out_path=tmp / "onnx" / name)
    result = _export_onnx_fn()(run_dir, tmp / "onnx", fp16=True)
    path = getattr(result, "fp16_path" if precision == "fp16" else "onnx_path", None) or tmp / "onnx" / name
    if not Path(path).exists():
        raise ArtifactError(f"export_onnx wrote no {name} into {tmp / 'onnx'}; export the run with `ctxsim export`")
    return Path(path)


def _engine_artifact(run_dir: Path, precision: str, tmp: Path) -> Path:
    """run_dir/export/model.<precision>.engine if present, else built on this GPU from the ONNX file of that
    precision (engines are strongly typed)."""
    p = run_dir / "export" / f"model.{precision}.engine"
    if p.exists():
        return p
    from ctxsim.export.tensorrt import build_engine

    built = build_engine(_onnx_artifact(run_dir, precision, tmp), tmp / f"trt-{precision}", precision=precision)
    return Path(built.path)


def _skip_reason(backend: str, precision: str, device: str) -> str | None:
    import torch

    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "TensorRT not installed"
        if not torch.cuda.is_available():
            return "TensorRT needs a CUDA GPU"
    if precision not in ("fp32", "fp16", "int8"):
        return f"unknown precision {precision}"
    if backend == "torch" and precision == "int8":
        return "int8 is for ONNX Runtime and TensorRT"
    if backend == "torch" and precision != "fp32" and (device == "cpu" or not torch.cuda.is_available()):
        return f"{precision} needs CUDA"
    return None


# ---------------------------------------------------------------------------------------------- bench
def bench(run_dir: str | os.PathLike, backends: Sequence[str] = BACKENDS, batches: Sequence[int] = (1, 32),
          index_types: Sequence[str] = ("flat", "ivf", "ivfpq", "hnsw", "torch"), limit: int | None = None,
          precisions: Sequence[str] = PRECISIONS, data_root: str | None = None,
          out_dir: str | os.PathLike | None = None, device: str = "auto", time_budget_s: float = 3.0,
          progress: Callable[[str], None] | None = None) -> BenchReport:
    """Benchmark ``run_dir`` on this machine; see the module docstring. Writes bench.json/bench.md to ``out_dir``
    (default ``run_dir/bench``) and returns the report. ``progress(message)`` is called before each step."""
    from ctxsim.data.pipeline import open_eval_dataset
    from ctxsim.deploy.embedder import Embedder, resolve_device
    from ctxsim.deploy.index import INDEX_TYPES, Index
    from ctxsim.evaluate import retrieval_metrics
    from ctxsim.nets import read_card
    from ctxsim.runs import run_config

    run_dir = Path(run_dir)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ConfigError(f"unknown backend(s) {unknown}; use {', '.join(BACKENDS)}")
    bad_types = [t for t in index_types if t not in INDEX_TYPES]
    if bad_types:
        raise ConfigError(f"unknown index type(s) {bad_types}; use {', '.join(INDEX_TYPES)}")
    if not batches or any(int(b) < 1 for b in batches):
        raise ConfigError(f"batches must be positive integers, got {batches}")
    say = progress or (lambda msg: logger.info(msg))
    dev = resolve_device(device)
    card = read_card(run_dir)
    cfg = run_config(run_dir, data_root)
    say("opening the evaluation split")
    dataset = open_eval_dataset(cfg, card.preprocess, limit)
    images = [dataset.load_image(i) for i in range(len(dataset))]
    labels = np.asarray(dataset.labels)
    report = BenchReport(machine_info(), str(run_dir), card.fingerprint, cfg.data.dataset, len(images),
                         int(dataset.num_classes), created=time.strftime("%Y-%m-%d %H:%M:%S"))
    big = max(int(b) for b in batches)
    ref_emb: np.ndarray | None = None
    ref_r1: float | None = None

    with tempfile.TemporaryDirectory(prefix="ctxsim-bench-") as td:
        tmp = Path(td)
        for backend in backends:
            for precision in precisions:
                row = BackendRow(backend, precision, "ok")
                report.rows.append(row)
                reason = _skip_reason(backend, precision, dev)
                if reason:
                    row.status = f"skipped: {reason}"
                    continue
                say(f"{backend} {precision}")
                try:
                    if backend == "torch":
                        art = run_dir
                        row.size_mb = (run_dir / "model.safetensors").stat().st_size / 1e6
                    elif backend == "onnx":
                        art = _onnx_artifact(run_dir, precision, tmp)
                        row.size_mb = art.stat().st_size / 1e6
                    else:
                        art = _engine_artifact(run_dir, precision, tmp)
                        row.size_mb = art.stat().st_size / 1e6
                    options: dict[str, Any] = {"precision": precision} if backend == "torch" else {}
                    emb = Embedder.from_artifact(art, device=dev, batch_size=big, **options)
                    row.artifact, row.runner = str(art), emb.backend
                    if emb.fingerprint != card.fingerprint:
                        raise ConfigError(f"artifact fingerprint {emb.fingerprint} != run {card.fingerprint}")
                    one = emb.preprocess(images[:1])
                    t1 = _timeit(functools.partial(emb.run, one), 10, 500, time_budget_s)
                    row.latency_p50_ms = float(np.percentile(t1, 50) * 1e3)
                    row.latency_p99_ms = float(np.percentile(t1, 99) * 1e3)
                    reps = (images * (big // max(len(images), 1) + 1))[:big]
                    xb = emb.preprocess(reps)
                    tb = _timeit(functools.partial(emb.run, xb), 3, 100, time_budget_s)
                    row.batch, row.throughput_ips = big, float(big / np.median(tb))
                    e = emb.embed(images)
                    m = retrieval_metrics(e, labels, ks=(1,))
                    row.r_at_1, row.map_at_r = float(m["R@1"]), float(m["MAP@R"])
                    if backend == "torch" and precision == "fp32":
                        ref_emb, ref_r1 = e, row.r_at_1
                    elif ref_emb is None:
                        ref_emb = e
                except Exception as ex:  # a row that fails is reported, the bench goes on
                    logger.debug("bench row %s/%s failed", backend, precision, exc_info=True)
                    row.status = f"failed: {_reason(ex)}"
        for row in report.rows:
            if row.r_at_1 is not None and ref_r1 is not None:
                row.delta_r_at_1 = row.r_at_1 - ref_r1

    if ref_emb is None and index_types:
        say("embedding the evaluation split with the PyTorch model for the index rows")
        ref_emb = Embedder.from_artifact(run_dir, device=dev, batch_size=big).embed(images)
    for t in index_types:
        assert ref_emb is not None  # embedded above whenever there are index rows
        srow = SearchRow(t, "ok")
        report.search.append(srow)
        say(f"index {t}")
        try:
            t0 = time.perf_counter()
            idx = Index.from_embeddings(ref_emb, t)
            srow.build_s = time.perf_counter() - t0
            srow.params = dict(idx.info.params)
            q = ref_emb
            tb = _timeit(functools.partial(idx.search, q, 10), 2, 20, time_budget_s)
            srow.qps_batch = float(len(q) / np.median(tb))
            singles = q[: min(200, len(q))]
            ts = _timeit(functools.partial(_one_by_one, idx, singles), 1, 10, time_budget_s)
            srow.qps_single = float(len(singles) / np.median(ts))
            _, approx = idx.search(q, 10)
            _, exact = idx.exact_search(q, 10)
            kk = exact.shape[1]
            srow.recall_at_10 = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / kk
                                               for a, b in zip(approx, exact)]))
        except Exception as ex:
            logger.debug("bench index %s failed", t, exc_info=True)
            srow.status = f"failed: {_reason(ex)}"

    report.save(out_dir if out_dir is not None else run_dir / "bench")
    return report
