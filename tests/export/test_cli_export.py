"""The `export` and `parity` commands (cli/export_cmds.py) on a Typer app of their own."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from ctxsim.cli.export_cmds import register
from ctxsim.errors import CtxsimError, ParityFailed

from export_helpers import perturb_onnx


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    a = typer.Typer()
    register(a)
    return a


def test_parity_command_exit_codes(app, tmp_path, convnet_run, convnet_export):
    runner = CliRunner()
    ok = runner.invoke(app, ["parity", str(convnet_run), "--artifact", str(convnet_export.onnx_path), "--limit", "400"])
    assert ok.exit_code == 0, ok.output
    assert "pass" in ok.output

    damaged = perturb_onnx(convnet_export.onnx_path, tmp_path / "bad" / "model.onnx")
    bad = runner.invoke(app, ["parity", str(convnet_run), "--artifact", str(damaged), "--limit", "400"])
    assert isinstance(bad.exception, ParityFailed)  # main() prints it as one line and exits 1
    assert "min_cosine" in str(bad.exception) and "FAIL" in bad.output
    assert "R@1 flips" in bad.output  # the flips column, with how many of them are near-ties

    user_error = runner.invoke(app, ["parity", str(convnet_run), "--artifact", str(tmp_path / "missing.onnx")])
    assert isinstance(user_error.exception, CtxsimError)  # main() prints it as one line and exits 2


def test_failed_parity_exits_1_with_one_line(tmp_path, convnet_run, convnet_export):
    """Through the console entry point: a failed check is a verdict (exit 1, one line), not bad input (exit 2)."""
    damaged = perturb_onnx(convnet_export.onnx_path, tmp_path / "bad" / "model.onnx")
    proc = subprocess.run([sys.executable, "-m", "ctxsim.cli", "parity", str(convnet_run), "--artifact", str(damaged),
                           "--limit", "400"], capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()  # the progress bar, then the verdict
    assert lines[-1].startswith("error: parity failed for model.onnx (fp32): min cosine")
    assert "(min_cosine)" in lines[-1]
    assert not any("min_cosine" in line for line in lines[:-1]) and "Traceback" not in proc.stderr  # said once
    assert "FAIL" in proc.stdout  # the table is printed first


def test_export_command_writes_the_folder(app, tmp_path, convnet_run):
    out = tmp_path / "exp"
    res = CliRunner().invoke(app, ["export", str(convnet_run), "--out", str(out), "--no-fp16", "--no-parity",
                                   "--triton"])
    assert res.exit_code == 0, res.output
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    assert (out / "triton" / "ctxsim_onnx" / "config.pbtxt").is_file()
