"""index.json and model.json as a hostile user writes them: every command that reads them answers one line and
exit 2 (or works), never a traceback (issue 11 section 5). The property tests mutate real files of real indexes
and run folders and go through the CLI's own error handling (ctxsim.cli.app.main)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_helpers import assert_one_line, mutated, run_main

PROPERTY = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, gallery_dir, run_dir, flat_index) -> dict[str, Path]:
    """A flat (the shared one), an HNSW, an IVF and a torch index over the same small gallery."""
    from ctxsim.deploy import build_index

    images = sorted(gallery_dir.rglob("*.png"))[:80]
    lst = tmp_path_factory.mktemp("lists") / "g.txt"
    lst.write_text("".join(f"{p} {p.parent.name}\n" for p in images))
    out = {"flat": flat_index}
    for kind in ("hnsw", "ivf", "torch"):
        out[kind] = tmp_path_factory.mktemp(kind)
        build_index(lst, run_dir, out[kind], kind)
    return out


@pytest.fixture(scope="module")
def query(gallery_dir) -> Path:
    return sorted(gallery_dir.rglob("*.png"))[0]


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- the cases
def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxsim.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def _edit(folder: Path, **changes: Any) -> Path:
    meta = json.loads((folder / "index.json").read_text())
    meta.update(changes)
    (folder / "index.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("changes, words", [
    ({"files": {}}, "names no items file"),
    ({"sha256": None}, "sha256 must be a mapping, got None"),
    ({"format_version": "one"}, "format_version must be an integer, got 'one'"),
    ({"count": "600"}, "count must be an integer, got '600'"),
    ({"dim": True}, "dim must be an integer, got True"),
])
def test_damaged_index_json_is_one_line_exit_2(tmp_path, flat_index, query, changes, words):
    idx = _edit(_copy(flat_index, tmp_path / "idx"), **changes)
    for args in (("index", "info", idx), ("search", idx, query)):
        proc = _cli(*args)
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip()
        assert len(line.splitlines()) == 1 and words in line and "index.json" in line, line


def test_serve_refuses_a_damaged_index_json_with_one_line(tmp_path, flat_index):
    idx = _edit(_copy(flat_index, tmp_path / "idx"), files={})
    proc = _cli("serve", idx, "--port", "0")
    assert proc.returncode == 2 and "names no items file" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_index_info_refuses_an_index_whose_item_file_was_deleted(tmp_path, flat_index):
    idx = _copy(flat_index, tmp_path / "idx")
    items = json.loads((idx / "index.json").read_text())["files"]["items"]
    assert _cli("index", "info", idx).returncode == 0
    (idx / items).unlink()
    proc = _cli("index", "info", idx)
    assert proc.returncode == 2 and f"{items} (items) named by index.json is missing" in proc.stderr, proc.stderr


def test_an_index_json_that_calls_one_kind_of_index_another_is_refused(tmp_path, indexes, query):
    idx = _edit(_copy(indexes["flat"], tmp_path / "idx"), index_type="hnsw", params={"efSearch": 64})
    proc = _cli("search", idx, query)
    assert proc.returncode == 2 and "holds a flat index of dimension" in proc.stderr, proc.stderr
    assert "not hnsw" in proc.stderr


# ---------------------------------------------------------------------------------------------- properties
@PROPERTY
@given(data=st.data())
def test_any_mutated_index_json_is_one_line_or_works(data, indexes, query, tmp_path, capsys, monkeypatch):
    kind = data.draw(st.sampled_from(sorted(indexes)))
    idx = _copy(indexes[kind], tmp_path / "idx")
    meta = json.loads((idx / "index.json").read_text())
    (idx / "index.json").write_text(json.dumps(data.draw(mutated(meta))))
    for argv in (["index", "info", str(idx)], ["search", str(idx), str(query), "-k", "3", "--json"]):
        assert_one_line(*run_main(argv, capsys, monkeypatch))


@PROPERTY
@given(data=st.data())
def test_any_mutated_model_json_is_one_line_or_works(data, flat_index, run_dir, query, tmp_path, capsys,
                                                     monkeypatch):
    run = _copy(run_dir, tmp_path / "run")
    card = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps(data.draw(mutated(card))))
    code, err = run_main(["search", str(flat_index), str(query), "--model", str(run), "-k", "3", "--json"],
                         capsys, monkeypatch)
    assert_one_line(code, err)


@pytest.mark.parametrize("kind", ["torch", "flat"])
def test_an_unreadable_embeddings_file_is_one_line(tmp_path, indexes, kind):
    """Loaded unverified (or truncated after hashing), a damaged .npy is an ArtifactError, not numpy's ValueError."""
    from ctxsim.deploy import load_index
    from ctxsim.errors import ArtifactError

    idx = _copy(indexes[kind], tmp_path / "idx")
    emb = idx / json.loads((idx / "index.json").read_text())["files"]["embeddings"]
    emb.write_bytes(emb.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"cannot read .*embeddings.*; rebuild the index"):
        index = load_index(idx, verify=False)
        index.embeddings  # noqa: B018 - the flat index maps its embeddings on load
