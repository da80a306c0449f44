"""Terminal rendering shared by the commands: rich tables, progress bars, and a callback adapter for training."""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

__all__ = ["TrainingDisplay", "console", "err_console", "metrics_table", "new_progress", "progress_callback",
           "show_logs"]

# piped output (CI logs, `| tee`) gets wide tables instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def show_logs(level: int = logging.WARNING) -> None:
    """Print the library's log records (logger "ctxsim") at ``level`` and above on stderr, through rich (so they
    do not tear progress bars); once per process."""
    log = logging.getLogger("ctxsim")
    if not any(isinstance(h, RichHandler) for h in log.handlers):
        log.addHandler(RichHandler(console=err_console, show_path=False, show_time=True, markup=False))
        log.propagate = False  # no second copy through the root logger's last-resort handler
    log.setLevel(level)


def metrics_table(title: str, rows: dict[str, dict[str, float]]) -> Table:
    """One row per name (e.g. split or backend), one column per metric."""
    table = Table(title=title)
    columns = list(dict.fromkeys(k for r in rows.values() for k in r))
    table.add_column("")
    for c in columns:
        table.add_column(c, justify="right")
    for name, r in rows.items():
        table.add_row(name, *[_fmt(r.get(c)) for c in columns])
    return table


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def new_progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err_console, transient=False)


@contextmanager
def progress_callback(description: str) -> Iterator:
    """A (done, total) callback drawing one progress bar."""
    with new_progress() as p:
        task = p.add_task(description, total=None, info="")

        def update(done: int, total: int) -> None:
            p.update(task, completed=done, total=total)

        yield update


class TrainingDisplay:
    """Turns Trainer events into a progress bar per epoch and a line per evaluation."""

    def __init__(self, progress: Progress):
        self.p = progress
        self.task: TaskID | None = None

    def __call__(self, event: str, **info: Any) -> None:
        if event == "start":
            err_console.print(f"training on {info['device']}: {info['train_images']} images, "
                              f"{info['train_classes']} classes, epochs {info['start_epoch'] + 1}..{info['epochs']}")
        elif event == "step":
            if self.task is None or info["step"] == 1:
                if self.task is not None:
                    self.p.remove_task(self.task)
                self.task = self.p.add_task(f"epoch {info['epoch'] + 1}", total=info["steps"], info="")
            self.p.update(self.task, completed=info["step"],
                          info=f"loss {info['loss']:.4f}  {info['images_per_s']:.0f} img/s")
        elif event == "eval":
            r = info["record"]
            shown = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if "/" in k and ("R@1" in k or "MAP@R" in k))
            self.p.console.print(f"epoch {info['epoch']}: loss {r['loss']:.4f}  {shown}")
