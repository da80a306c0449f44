"""The CLI: help with examples, one-line user errors with exit status 2, train and eval end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctxsim.cli.app import app

runner = CliRunner()


def ctxsim(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed console entry point as a user would."""
    return subprocess.run([sys.executable, "-m", "ctxsim.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("command", ["train", "eval", "demo", "recipes", "export", "parity", "index build",
                                     "index add", "index info", "embed", "search", "serve", "bench"])
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output


def test_user_error_is_one_line_exit_2(tmp_path):
    proc = ctxsim("train", "--recipe", "no-such-recipe", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown recipe 'no-such-recipe'")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = ctxsim("eval", str(tmp_path))
    assert proc.returncode == 2 and "not a run folder" in proc.stderr


def test_recipes_lists_shipped_recipes():
    proc = ctxsim("recipes")
    assert proc.returncode == 0
    assert "omniglot" in proc.stdout and "digits-demo" in proc.stdout


def test_train_then_eval(tmp_path):
    run = tmp_path / "run"
    proc = ctxsim("train", "--recipe", "digits-demo", "--out", str(run), "--epochs", "1",
                  "--set", "data.batches_per_epoch=2")
    assert proc.returncode == 0, proc.stderr
    assert "R@1" in proc.stdout
    proc = ctxsim("eval", str(run), "--json")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    saved = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["R@1"] == pytest.approx(saved["test/R@1"], abs=1e-6)
    assert json.loads((run / "eval.json").read_text())["metrics"] == metrics
