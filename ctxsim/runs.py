"""Operations on a finished run folder: evaluate its model on the held-out classes of its data."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ctxsim.config import config_from_dict, load_yaml
from ctxsim.embed import embed_dataset
from ctxsim.errors import ArtifactError
from ctxsim.evaluate import retrieval_metrics
from ctxsim.io import atomic_write_json
from ctxsim.nets import load_run

__all__ = ["evaluate_model", "evaluate_run", "run_config"]


def evaluate_model(model: torch.nn.Module, split, ks=(1, 2, 4, 8), batch_size: int = 256, device="cpu",
                   num_workers: int = 0, amp_dtype=None, progress=None) -> dict[str, float]:
    """Retrieval metrics of ``model`` on one evaluation split: a dataset (leave-one-out) or a (query, gallery)
    pair sharing one label space (In-Shop)."""
    if isinstance(split, tuple):
        query, gallery = split
        q, ql = embed_dataset(model, query, batch_size, device, num_workers, amp_dtype, progress)
        g, gl = embed_dataset(model, gallery, batch_size, device, num_workers, amp_dtype, progress)
        return retrieval_metrics(g, gl, ks=tuple(ks), query_embeddings=q, query_labels=ql)
    emb, labels = embed_dataset(model, split, batch_size, device, num_workers, amp_dtype, progress)
    return retrieval_metrics(emb, labels, ks=tuple(ks))


def run_config(run_dir: str | Path, data_root: str | None = None):
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.exists():
        raise ArtifactError(f"{run_dir} is not a run folder (no config.yaml); train one with `ctxsim train`")
    cfg = config_from_dict(load_yaml(path))
    if data_root:
        cfg.data.root = str(data_root)
    return cfg


def evaluate_run(run_dir: str | Path, data_root: str | None = None, batch_size: int = 256,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Embed the run's evaluation split with its saved model and return retrieval metrics (also eval.json)."""
    from ctxsim.data.pipeline import open_eval_split

    cfg = run_config(run_dir, data_root)
    model, card = load_run(run_dir)
    split = open_eval_split(cfg, card.preprocess)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = evaluate_model(model.to(device), split, cfg.eval_ks, batch_size, device, progress=progress)
    images = sum(map(len, split)) if isinstance(split, tuple) else len(split)
    atomic_write_json(Path(run_dir) / "eval.json", {"metrics": metrics, "images": images,
                                                    "dataset": cfg.data.dataset, "fingerprint": card.fingerprint})
    return metrics
