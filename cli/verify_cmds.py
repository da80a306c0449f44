"""`ctxsim verify`: a thin command over ctxsim.deploy.verify (wired into the app by ``register``)."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ctxsim.cli.console import console, err_console

__all__ = ["register", "report_table"]

_STYLE = {"ok": "[green]ok[/green]", "FAIL": "[red]FAIL[/red]", "-": "[dim]-[/dim]"}


def report_table(report) -> Table:
    """One row per check: item, what was checked, status (ok / FAIL / - for nothing recorded), detail."""
    table = Table(title=f"{report.kind} folder {report.path}")
    for col in ("item", "check", "status", "detail"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        table.add_row(c.item, c.check, _STYLE.get(c.status, c.status), c.detail)
    return table


def register(app: typer.Typer) -> None:
    """Add the `verify` command to ``app``."""

    @app.command("verify", epilog="Example: ctxsim verify runs/omni/export && rsync -a runs/omni/export fleet:")
    def verify_cmd(
        path: Path = typer.Argument(..., help="A run folder, an export folder or an index folder."),
        json_out: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
    ) -> None:
        """Check every recorded hash, fingerprint and parity verdict of a folder, as readers do before trusting it.

        Exits 0 when everything is bound and consistent, 1 when anything is not (each failure is named), 2 when
        PATH is not a run, export or index folder."""
        from ctxsim.deploy.verify import verify

        report = verify(path)
        if json_out:
            console.print_json(json.dumps(report.to_dict()))
        else:
            console.print(report_table(report))
        failures = report.failures
        if failures:
            for c in failures:
                err_console.print(f"[red]not verified:[/red] {c.item}: {c.check}: {c.detail}", highlight=False,
                                  soft_wrap=True)
            raise typer.Exit(1)
        if not json_out:
            console.print(f"verified: {len(report.checks)} checks, everything bound and consistent")
