"""`ctxsim demo`: the offline end-to-end job on scikit-learn's digits, ending in one summary table.

train (digits 0-4) -> evaluate on the unseen digits 5-9 -> export ONNX + fp16 with parity -> write the held-out
digits as PNG files -> build a FAISS index with the exported model -> search it (grid PNG) -> bench table.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ctxsim.config import resolve_config
from ctxsim.train import train


@dataclass
class DemoSummary:
    run_dir: Path
    tables: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def _write_gallery(folder: Path) -> Path:
    """The held-out digits as real PNG files in a class-per-folder tree (what a user's gallery looks like)."""
    from ctxsim.data.digits import digits

    ds = digits("test")
    for i in range(len(ds)):
        d = folder / ds.class_names[ds.labels[i]]
        d.mkdir(parents=True, exist_ok=True)
        ds.load_image(i).save(d / f"{i:04d}.png")
    return folder


def _untrained_metrics(cfg) -> dict[str, float]:
    """The same architecture before any training: the baseline the trained model must beat."""
    import torch

    from ctxsim.data.pipeline import open_eval_dataset
    from ctxsim.embed import embed_dataset
    from ctxsim.evaluate import retrieval_metrics
    from ctxsim.nets import EmbeddingNet

    torch.manual_seed(cfg.seed)
    emb, labels = embed_dataset(EmbeddingNet(cfg.model), open_eval_dataset(cfg, cfg.preprocess))
    return retrieval_metrics(emb, labels, ks=tuple(cfg.eval_ks))


def run_demo(out_dir: str | Path = "runs/demo", epochs: int = 5, callback: Callable[..., None] | None = None,
             seed: int = 0, say: Callable[[str], None] = lambda msg: None) -> DemoSummary:
    """Run every stage on digits; each stage's figures go into ``summary.tables``."""
    from ctxsim.deploy.bench import bench
    from ctxsim.deploy.index import build_index
    from ctxsim.deploy.search import search, write_grid
    from ctxsim.export import export_run

    out_dir = Path(out_dir)
    if out_dir.exists():  # the demo owns its folder: a rerun starts clean
        shutil.rmtree(out_dir)
    run_dir = out_dir / "run"
    cfg = resolve_config("digits-demo", overrides={"epochs": epochs, "seed": seed})
    untrained = _untrained_metrics(cfg)
    result = train(cfg, run_dir, callback)
    summary = DemoSummary(run_dir)
    first = {k.split("/", 1)[1]: v for k, v in result.history[0].items() if k.startswith("test/")}
    summary.tables["training: digits 5-9, classes never seen in training (leave-one-out retrieval)"] = {
        "untrained network": untrained, "after epoch 1": first, f"after epoch {epochs}": result.metrics}

    say("exporting to ONNX and checking parity")
    exported = export_run(run_dir, out_dir / "export", fp16=True)
    summary.tables["export: parity of each artifact against the PyTorch fp32 model"] = {
        name: {"passed": "yes" if r.passed else "NO", "min cosine": r.embedding["cosine_min"],
               "R@1 ref": r.retrieval["reference"]["R@1"], "R@1 artifact": r.retrieval["artifact"]["R@1"],
               "R@1 flips (near-ties)": f"{r.retrieval['ties']['flips']} ({r.retrieval['ties']['flips_near_tied']})",
               "kNN Jaccard": r.neighbours["jaccard_mean"], "cross R@1": r.cross["R@1"]}
        for name, r in exported.parity.items()}

    say("indexing the held-out digits with the exported model")
    gallery = _write_gallery(out_dir / "gallery")
    info = build_index(gallery, exported.onnx_path, out_dir / "index", index_type="flat")
    queries = [(sorted(d.glob("*.png"))[7], d.name) for d in sorted(gallery.iterdir())]  # one per digit
    results = search(out_dir / "index", queries, k=6)
    write_grid(results, out_dir / "search.png")
    # the first hit is the query itself (it is in the gallery); judge the next five
    hits = [sum(n.label == r.label for n in r.neighbors[1:]) / 5 for r in results]
    summary.tables["index + search: flat FAISS index of the held-out digits"] = {
        "index": {"items": info.count, "dim": info.dim, "type": info.index_type,
                  "queries": len(results), "same-digit share of top-5": sum(hits) / len(hits)}}
    summary.files.update(index=out_dir / "index", grid=out_dir / "search.png", export=out_dir / "export")

    say("benchmarking backends and index types")
    report = bench(run_dir, backends=("torch", "onnx", "tensorrt"), batches=(1, 32),
                   index_types=("flat", "hnsw", "torch"), out_dir=out_dir / "bench", time_budget_s=0.5)
    summary.tables["bench: this machine"] = {
        f"{r.backend} {r.precision}": {"status": r.status, "p50 ms": r.latency_p50_ms,
                                       "img/s": r.throughput_ips, "R@1": r.r_at_1, "ΔR@1": r.delta_r_at_1}
        for r in report.rows}
    summary.files["bench"] = out_dir / "bench" / "bench.md"
    return summary
