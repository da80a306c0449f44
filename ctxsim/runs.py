"""Operations on a finished run folder: evaluate its model on the held-out classes of its data."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import yaml

from ctxsim.config import config_from_dict
from ctxsim.embed import embed_dataset
from ctxsim.errors import ArtifactError
from ctxsim.evaluate import retrieval_metrics
from ctxsim.io import atomic_write_json
from ctxsim.nets import load_run


def run_config(run_dir: str | Path, data_root: str | None = None):
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.exists():
        raise ArtifactError(f"{run_dir} is not a run folder (no config.yaml); train one with `ctxsim train`")
    cfg = config_from_dict(yaml.safe_load(path.read_text()))
    if data_root:
        cfg.data.root = str(data_root)
    return cfg


def evaluate_run(run_dir: str | Path, data_root: str | None = None, batch_size: int = 256,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Embed the run's evaluation split with its saved model and return retrieval metrics (also eval.json)."""
    from ctxsim.data.pipeline import open_eval_dataset

    cfg = run_config(run_dir, data_root)
    model, card = load_run(run_dir)
    dataset = open_eval_dataset(cfg, card.preprocess)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    emb, labels = embed_dataset(model.to(device), dataset, batch_size, device, progress=progress)
    metrics = retrieval_metrics(emb, labels, ks=tuple(cfg.eval_ks))
    atomic_write_json(Path(run_dir) / "eval.json", {"metrics": metrics, "images": len(labels),
                                                    "dataset": cfg.data.dataset, "fingerprint": card.fingerprint})
    return metrics
