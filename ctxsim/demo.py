"""`ctxsim demo`: the offline end-to-end job on scikit-learn's digits, ending in one summary table."""
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


def run_demo(out_dir: str | Path = "runs/demo", epochs: int = 8, callback: Callable[..., None] | None = None,
             seed: int = 0) -> DemoSummary:
    """Train on digits 0-4, evaluate on the unseen digits 5-9; later stages extend the summary."""
    out_dir = Path(out_dir)
    run_dir = out_dir / "run"
    if run_dir.exists():  # the demo owns its folder: a rerun starts clean
        shutil.rmtree(run_dir)
    cfg = resolve_config("digits-demo", overrides={"epochs": epochs, "seed": seed})
    result = train(cfg, run_dir, callback)
    summary = DemoSummary(run_dir)
    first = result.history[0]
    summary.tables["digits 5-9 (classes never seen in training)"] = {
        "after epoch 1": {k.split("/", 1)[1]: v for k, v in first.items() if k.startswith("test/")},
        f"after epoch {epochs}": result.metrics,
    }
    return summary
