"""The `ctxsim` command: parse options, call one library function, print the result."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import typer

from ctxsim.cli.console import (
    TrainingDisplay,
    console,
    err_console,
    metrics_table,
    new_progress,
    progress_callback,
    show_logs,
)
from ctxsim.errors import CtxsimError, ParityFailed

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Contextual-similarity metric learning: train, evaluate, export, index and search.")


@app.command(epilog="Example: ctxsim train --recipe omniglot --data ../shared/data/omniglot --out runs/omni")
def train(
    recipe: str | None = typer.Option(None, help="Shipped recipe name (see `ctxsim recipes`) or a YAML path."),
    config: Path | None = typer.Option(None, help="A YAML config file (applied after the recipe)."),
    data: str | None = typer.Option(None, help="Dataset root (sets data.root); omniglot-mini names the Omniglot "
                                               "sample shipped in the package (no path)."),
    out: Path = typer.Option(Path("runs/latest"), help="Run folder to create."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, e.g. --set optim.lr=3e-4 (repeatable)."),
    epochs: int | None = typer.Option(None, help="Number of epochs (sets epochs)."),
    weights: Path | None = typer.Option(None, help="Local backbone weights (safetensors or tensor-only .pt)."),
    resume: Path | None = typer.Option(None, help="Continue the run in this folder from its last checkpoint."),
    gpus: int = typer.Option(1, help="Train on N GPUs of this machine with DDP (torchrun); data.batch_size is the "
                                     "global batch and must be divisible by m x N."),
    check: bool = typer.Option(False, "--check", help="Check the settings: build the data, model, loss and "
                                                      "optimiser and run one step, then stop (writes nothing)."),
) -> None:
    """Train an embedding model; writes config.yaml, model.safetensors, model.json, metrics.jsonl."""
    from ctxsim.config import parse_set, resolve_config
    from ctxsim.train import resume as resume_run
    from ctxsim.train import train as train_run

    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_with_torchrun(gpus)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with (new_progress() if main_rank else contextlib.nullcontext()) as p:
        display = TrainingDisplay(p) if p is not None else None  # p: None off the main rank
        if resume:
            result = resume_run(resume, display, epochs)
        else:
            overrides = parse_set(set_)
            if data:
                overrides.setdefault("data", {})["root"] = data
            if epochs:
                overrides["epochs"] = epochs
            cfg = resolve_config(recipe, config, overrides)
            if check:
                from ctxsim.train import check_config

                loss = check_config(cfg, weights)
                console.print(f"settings ok: one step on {cfg.data.dataset} ran, loss {loss:.4f}")
                return
            result = train_run(cfg, out, display, weights)
    if not main_rank:
        return
    console.print(metrics_table(f"held-out classes, epoch {len(result.history)}", {"test": result.metrics}))
    console.print(f"run folder: {result.run_dir}")


def _relaunch_with_torchrun(gpus: int) -> None:
    """Replace this process by `torchrun --nproc_per_node N -m ctxsim.cli <same arguments without --gpus>`."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            argv.append(arg)
    os.execvp(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={gpus}", "-m", "ctxsim.cli", *argv])


@app.command("eval", epilog="Example: ctxsim eval runs/omni --data ../shared/data/omniglot")
def eval_(
    run_dir: Path = typer.Argument(..., help="A run folder from `ctxsim train`."),
    data: str | None = typer.Option(None, help="Dataset root, if it moved since training."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Evaluate a run on its held-out classes (Recall@K, MAP@R, R-precision); writes eval.json."""
    from ctxsim.runs import evaluate_run

    with progress_callback("embedding") as progress:
        metrics = evaluate_run(run_dir, data, progress=progress)
    if json_out:
        console.print_json(json.dumps(metrics))
    else:
        console.print(metrics_table(f"{run_dir}", {"held-out": metrics}))


@app.command(epilog="Example: ctxsim recipes")
def recipes() -> None:
    """List the shipped training recipes."""
    from ctxsim.config import list_recipes, recipe_path

    for name in list_recipes():
        desc = (load_yaml_raw(recipe_path(name)).get("description") or "").strip().splitlines()
        console.print(f"[bold]{name}[/bold]  {desc[0] if desc else ''}")


def load_yaml_raw(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


@app.command(epilog="Example: ctxsim demo --out runs/demo   (or: ctxsim demo --dataset digits)")
def demo(out: Path = typer.Option(Path("runs/demo"), help="Where the demo writes its run, export and index."),
         dataset: str = typer.Option("omniglot-mini", help="omniglot-mini (the Omniglot sample shipped in the "
                                                           "package) or digits (scikit-learn's 8x8 digits)."),
         epochs: int | None = typer.Option(None, help="Training epochs (default: the dataset's demo recipe).")
         ) -> None:
    """Offline end-to-end demo on a shipped real sample: train, evaluate on unseen classes (untrained vs trained),
    export + parity, index, search, bench; writes summary.json and learning_curve.png beside its outputs."""
    from ctxsim.cli.demo import run_demo

    with new_progress() as p:
        summary = run_demo(out, epochs=epochs, callback=TrainingDisplay(p), say=p.console.print, dataset=dataset)
    for title, rows in summary.tables.items():
        console.print(metrics_table(title, rows))
    for name, path in summary.files.items():
        console.print(f"{name}: {path}")


from ctxsim.cli.deploy_cmds import register as _register_deploy  # noqa: E402
from ctxsim.cli.export_cmds import register as _register_export  # noqa: E402
from ctxsim.cli.verify_cmds import register as _register_verify  # noqa: E402

_register_export(app)
_register_deploy(app)
_register_verify(app)


#: what str.splitlines() breaks at, written as escapes: a user's file may name a key "\x85" or "a\nb"
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def main() -> None:
    show_logs()  # warnings (skipped images, a shadowed GPU runtime, ...) in the console's format
    try:
        app()
    except CtxsimError as e:
        from rich.markup import escape

        # one line, never wrapped; escaped, so "pip install 'ctxsim[cpu]'" is not read as rich markup
        err_console.print(f"[red]error:[/red] {escape(str(e).translate(_LINE_BREAKS))}", highlight=False,
                          soft_wrap=True)
        sys.exit(1 if isinstance(e, ParityFailed) else 2)  # a failed parity check is a verdict, not bad input
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
