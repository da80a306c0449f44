"""`ctxsim demo`: the offline end-to-end job on a real sample shipped in the package, ending in one summary.

Default dataset ``omniglot-mini`` (ctxsim/data/omniglot_mini/): train on 10 Omniglot background alphabets ->
evaluate the untrained and the trained network on 5 evaluation alphabets never seen in training -> export ONNX +
fp16 with parity -> write the held-out drawings as PNG files -> build a FAISS index with the exported model ->
search it (grid PNG) -> bench table. ``dataset="digits"`` runs the same stages on scikit-learn's digits (0-4 train,
5-9 held out). Besides the run, export, index and bench folders it writes ``summary.json`` (untrained and trained
metrics, the learning curve, each stage's wall time, the paths written) and ``learning_curve.png``.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctxsim.config import resolve_config
from ctxsim.errors import ConfigError
from ctxsim.io import atomic_write_json
from ctxsim.train import train

__all__ = ["DATASETS", "DemoDataset", "DemoSummary", "run_demo"]


@dataclass(frozen=True)
class DemoDataset:
    recipe: str
    title: str            # what the held-out classes are, for the training table
    queries: int          # query images drawn into the search grid
    item: str             # what one gallery class is ("digit", "character"), for the search table


DATASETS: dict[str, DemoDataset] = {
    "omniglot-mini": DemoDataset(
        "omniglot-mini", "5 held-out Omniglot alphabets, 148 characters never seen in training", 6, "character"),
    "digits": DemoDataset("digits-demo", "digits 5-9, classes never seen in training", 5, "digit"),
}


@dataclass
class DemoSummary:
    run_dir: Path
    tables: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    untrained: dict[str, float] = field(default_factory=dict)
    trained: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)   # held-out metrics by images seen (0 = untrained)
    stages_s: dict[str, float] = field(default_factory=dict)    # wall seconds of each stage

    def to_dict(self, dataset: str) -> dict[str, Any]:
        return {"dataset": dataset, "untrained": self.untrained, "trained": self.trained,
                "gain": {k: self.trained[k] - self.untrained[k] for k in self.trained if k in self.untrained},
                "curve": self.curve, "stages_s": self.stages_s, "total_s": sum(self.stages_s.values()),
                "tables": self.tables, "files": {k: str(v) for k, v in self.files.items()}}


def _write_gallery(test, folder: Path) -> Path:
    """The held-out images as real PNG files in a class-per-folder tree (what a user's gallery looks like)."""
    for i in range(len(test)):
        d = folder / test.class_names[test.labels[i]].replace("/", "__")
        d.mkdir(parents=True, exist_ok=True)
        test.load_image(i).save(d / f"{i:05d}.png")
    return folder


def _untrained_metrics(cfg) -> dict[str, float]:
    """The same architecture before any training: the baseline the trained model must beat."""
    import torch

    from ctxsim.data.pipeline import open_eval_dataset
    from ctxsim.embed import embed_dataset
    from ctxsim.evaluate import retrieval_metrics
    from ctxsim.nets import EmbeddingNet

    torch.manual_seed(cfg.seed)  # the trainer seeds the same way: this is the network training starts from
    emb, labels = embed_dataset(EmbeddingNet(cfg.model), open_eval_dataset(cfg, cfg.preprocess))
    return retrieval_metrics(emb, labels, ks=tuple(cfg.eval_ks))


def _plot_curve(curve: list[dict[str, Any]], title: str, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["images_seen"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for key, style in (("R@1", "o-"), ("MAP@R", "s--")):
        ax.plot(x, [p[key] for p in curve], style, label=key)
    for p in curve:
        ax.annotate(p["label"], (p["images_seen"], p["R@1"]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7)
    ax.set(xlabel="training images seen", ylabel="held-out retrieval", ylim=(0, 1), title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def run_demo(out_dir: str | Path = "runs/demo", epochs: int | None = None,
             callback: Callable[..., None] | None = None, seed: int = 0,
             say: Callable[[str], None] = lambda msg: None, dataset: str = "omniglot-mini") -> DemoSummary:
    """Run every stage on ``dataset`` (``omniglot-mini`` or ``digits``); each stage's figures go into
    ``summary.tables``, and ``out_dir/summary.json`` records them with the stage times and the paths written.
    ``epochs`` defaults to the dataset's recipe."""
    from ctxsim.data.pipeline import open_eval_dataset
    from ctxsim.deploy.bench import bench
    from ctxsim.deploy.index import build_index
    from ctxsim.deploy.search import search, write_grid
    from ctxsim.export import export_run
    from ctxsim.export.runners import import_onnxruntime

    if dataset not in DATASETS:
        raise ConfigError(f"unknown demo dataset {dataset!r}; use {' or '.join(DATASETS)}")
    import_onnxruntime()  # export, parity and the index need it: say so now, not after training
    spec = DATASETS[dataset]
    out_dir = Path(out_dir)
    if out_dir.exists():  # the demo owns its folder: a rerun starts clean
        shutil.rmtree(out_dir)
    run_dir = out_dir / "run"
    overrides: dict[str, Any] = {"seed": seed}
    if epochs is not None:
        overrides["epochs"] = epochs
    cfg = resolve_config(spec.recipe, overrides=overrides)
    summary = DemoSummary(run_dir)
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        summary.stages_s[stage] = round(now - clock, 2)
        clock = now

    say("evaluating the untrained network on the held-out classes")
    summary.untrained = _untrained_metrics(cfg)
    lap("untrained evaluation")
    steps: dict[str, int] = {}

    def on_event(event: str, **info: Any) -> None:
        if event == "start":
            steps["per_epoch"] = int(info["steps"])
        if callback is not None:
            callback(event, **info)

    result = train(cfg, run_dir, on_event)
    lap("training")
    summary.trained = dict(result.metrics)
    per_epoch = cfg.data.batch_size * steps.get("per_epoch", 0)  # images a training epoch sees (global batch)
    summary.curve = [{"label": "untrained", "epoch": 0, "images_seen": 0, **summary.untrained}]
    for rec in result.history:
        test = {k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith("test/")}
        if test:
            summary.curve.append({"label": f"epoch {rec['epoch']}", "epoch": rec["epoch"],
                                  "images_seen": rec["epoch"] * per_epoch, **test})
    rows: dict[str, dict[str, Any]] = {"untrained network": summary.untrained}
    if len(summary.curve) > 2:
        first = summary.curve[1]
        rows["after epoch 1"] = {k: v for k, v in first.items() if k not in ("label", "epoch", "images_seen")}
    rows[f"after epoch {cfg.epochs} (trained)"] = summary.trained
    rows["gain (trained - untrained)"] = {k: summary.trained[k] - summary.untrained[k]
                                          for k in summary.trained if k in summary.untrained}
    summary.tables[f"training: {spec.title} (leave-one-out retrieval)"] = rows
    summary.files["learning_curve"] = _plot_curve(
        summary.curve, f"{dataset}: {spec.title}", out_dir / "learning_curve.png")

    say("exporting to ONNX and checking parity")
    exported = export_run(run_dir, out_dir / "export", fp16=True)
    summary.tables["export: parity of each artifact against the PyTorch fp32 model"] = {
        name: {"passed": "yes" if r.passed else "NO", "min cosine": r.embedding["cosine_min"],
               "R@1 ref": r.retrieval["reference"]["R@1"], "R@1 artifact": r.retrieval["artifact"]["R@1"],
               "R@1 flips (near-ties)": f"{r.retrieval['ties']['flips']} ({r.retrieval['ties']['flips_near_tied']})",
               "kNN Jaccard": r.neighbours["jaccard_mean"], "cross R@1": r.cross["R@1"]}
        for name, r in exported.parity.items()}
    lap("export + parity")

    say("indexing the held-out images with the exported model")
    gallery = _write_gallery(open_eval_dataset(cfg, cfg.preprocess), out_dir / "gallery")
    info = build_index(gallery, exported.onnx_path, out_dir / "index", index_type="flat")
    lap("gallery + index")
    classes = sorted(gallery.iterdir())
    step = max(1, len(classes) // spec.queries)
    queries = [(sorted(d.glob("*.png"))[7], d.name) for d in classes[::step][:spec.queries]]
    results = search(out_dir / "index", queries, k=6)
    write_grid(results, out_dir / "search.png")
    # the first hit is the query itself (it is in the gallery); judge the next five
    hits = [sum(n.label == r.label for n in r.neighbors[1:]) / 5 for r in results]
    summary.tables[f"index + search: flat FAISS index of the held-out {spec.item}s"] = {
        "index": {"items": info.count, "dim": info.dim, "type": info.index_type,
                  "queries": len(results), f"same-{spec.item} share of top-5": sum(hits) / len(hits)}}
    summary.files.update(gallery=gallery, index=out_dir / "index", grid=out_dir / "search.png",
                         export=out_dir / "export")
    lap("search")

    say("benchmarking backends and index types")
    report = bench(run_dir, backends=("torch", "onnx", "tensorrt"), batches=(1, 32),
                   index_types=("flat", "hnsw", "torch"), out_dir=out_dir / "bench", time_budget_s=0.5)
    summary.tables["bench: this machine"] = {
        f"{r.backend} {r.precision}": {"status": r.status, "p50 ms": r.latency_p50_ms,
                                       "img/s": r.throughput_ips, "R@1": r.r_at_1, "ΔR@1": r.delta_r_at_1}
        for r in report.rows}
    lap("bench")
    summary.files.update(run=run_dir, bench=out_dir / "bench" / "bench.md", summary=out_dir / "summary.json")
    summary.tables["stages: wall seconds on this machine"] = {
        "seconds": {k: f"{v:.1f}" for k, v in {**summary.stages_s, "total": sum(summary.stages_s.values())}.items()}}
    atomic_write_json(out_dir / "summary.json", summary.to_dict(dataset))
    return summary

