"""Train the shipped omniglot recipe and record its held-out R@1 / MAP@R curve (table + PNG).

    python benchmarks/omniglot_curve.py [--data ../shared/data/omniglot] [--out runs/omniglot-curve] [--from-run DIR]

--from-run renders an existing run folder (e.g. one made by `ctxsim train --recipe omniglot`) without training.
Writes benchmarks/results/omniglot_curve.md and docs/omniglot_curve.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, markdown_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "omniglot"))
    ap.add_argument("--out", default="runs/omniglot-curve")
    ap.add_argument("--from-run", default=None)
    args = ap.parse_args()

    from ctxsim.train import read_history

    seconds = None
    run = Path(args.from_run or args.out)
    if not args.from_run:
        from ctxsim.config import resolve_config
        from ctxsim.train import train

        t0 = time.perf_counter()
        train(resolve_config("omniglot", overrides={"data": {"root": args.data}}), run)
        seconds = time.perf_counter() - t0
    history = read_history(run)
    rows = [[r["epoch"], f"{r['loss']:.4f}", f"{r['test/R@1']:.4f}", f"{r['test/R@2']:.4f}", f"{r['test/R@4']:.4f}",
             f"{r['test/R@8']:.4f}", f"{r['test/MAP@R']:.4f}", f"{r['images_per_s']:.0f}"] for r in history]
    table = markdown_table(["epoch", "train loss", "R@1", "R@2", "R@4", "R@8", "MAP@R", "train img/s"], rows)
    note = f"Machine: {machine()}." + (f" Wall time {seconds / 60:.1f} min." if seconds else "")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "omniglot_curve.md").write_text(table + "\n\n" + note + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(epochs, [r["test/R@1"] for r in history], "o-", label="R@1")
    ax.plot(epochs, [r["test/MAP@R"] for r in history], "s-", label="MAP@R")
    ax.axhline(0.58, color="grey", ls="--", lw=1, label="target R@1 0.58")
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out characters")
    ax.set_title("Omniglot evaluation set (13,180 images), hybrid loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE.parent / "docs" / "omniglot_curve.png")
    print(table)
    print(note)


if __name__ == "__main__":
    main()
