"""The thin deploy commands (cli/deploy_cmds.py) on a fresh Typer app."""
from __future__ import annotations

import json

import pytest

typer = pytest.importorskip("typer")
from typer.testing import CliRunner  # noqa: E402


@pytest.fixture()
def cli():
    from ctxsim.cli.deploy_cmds import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_index_build_info_search(tmp_path, cli, gallery_dir, run_dir, other_run_dir):
    out = tmp_path / "idx"
    r = cli("index", "build", gallery_dir, "--model", run_dir, "--out", out, "--type", "hnsw", "--param", "M=16")
    assert r.exit_code == 0, r.output
    r = cli("index", "info", out, "--json", "--check-recall", "5")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["index_type"] == "hnsw" and info["params"]["M"] == 16 and info["recall"]["k"] == 5
    q = sorted(sorted(gallery_dir.iterdir())[0].iterdir())[0]
    r = cli("search", out, q, "-k", "4", "--grid", tmp_path / "g.png", "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "g.png").exists()
    r = cli("index", "build", gallery_dir, "--model", run_dir, "--out", out)
    assert r.exit_code != 0 and "already holds an index" in str(r.exception)  # no --force
    r = cli("search", out, q, "--model", other_run_dir)
    from ctxsim.errors import FingerprintMismatch

    assert isinstance(r.exception, FingerprintMismatch)


def test_index_build_and_add_with_device_decode(tmp_path, cli, gallery_dir, run_dir):
    from PIL import Image

    pngs = sorted(gallery_dir.rglob("*.png"))[:12]
    lines = []
    for i, png in enumerate(pngs):
        with Image.open(png) as im:
            im.convert("L").save(tmp_path / f"{i}.jpg", quality=90)
        lines.append(f"{tmp_path / f'{i}.jpg'} {png.parent.name}")
    (tmp_path / "first.txt").write_text("\n".join(lines[:8]) + "\n")
    (tmp_path / "more.txt").write_text("\n".join(lines[8:]) + "\n")
    out = tmp_path / "idx"
    r = cli("index", "build", tmp_path / "first.txt", "--model", run_dir, "--out", out, "--device-decode")
    assert r.exit_code == 0, r.output
    r = cli("index", "add", out, tmp_path / "more.txt", "--device-decode")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "index.json").read_text())["count"] == 12
    r = cli("search", out, tmp_path / "9.jpg", "-k", "1", "--json")
    assert r.exit_code == 0, r.output
    top = json.loads(r.output)["results"][0]["neighbors"][0]
    assert top["path"].endswith("9.jpg") and top["score"] > 0.999


def test_token_file_keeps_the_secret_out_of_the_process_list(tmp_path, cli):
    from ctxsim.deploy.serve import read_token_file
    from ctxsim.errors import ConfigError

    f = tmp_path / "token"
    f.write_text("  s3cret-token \nignored second line\n")
    assert read_token_file(f) == "s3cret-token"
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token_file(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot read the token file"):
        read_token_file(tmp_path / "missing")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(tmp_path / "binary")
    # both forms at once is refused before anything starts
    result = cli("serve", tmp_path / "idx", "--token", "x", "--token-file", f)
    assert isinstance(result.exception, ConfigError) and "give the token once" in str(result.exception)
    help_text = cli("serve", "--help").output
    assert "--token-file" in help_text and "CTXSIM_TOKEN" in help_text
