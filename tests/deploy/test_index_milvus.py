"""Milvus as an index engine, against a real Milvus Lite (an embedded database file; no server): build, add, search
equal to FAISS flat, fingerprint refusal, reopening in a new process, and a SIGKILLed `index add`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install 'ctxsim[milvus]')")
pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'ctxsim[milvus]')")

from ctxsim.deploy import add_to_index, build_index, load_index
from ctxsim.deploy.index import build_from_embeddings
from ctxsim.errors import ConfigError, FingerprintMismatch

pytestmark = pytest.mark.milvus


@pytest.fixture(scope="module")
def milvus_index(tmp_path_factory, gallery_dir, run_dir) -> Path:
    """A Milvus Lite (flat) index over gallery_dir: copy it before changing it."""
    out = tmp_path_factory.mktemp("milvus") / "idx"
    build_index(gallery_dir, run_dir, out, "flat", engine="milvus")
    return out


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxsim.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_build_records_milvus_and_searches_like_faiss_flat(milvus_index, flat_index):
    meta = json.loads((milvus_index / "index.json").read_text())
    assert meta["engine"] == "milvus" and meta["metric"] == "ip" and "index" not in meta["files"]
    m = meta["milvus"]
    assert m["uri"] == "milvus.db" and m["collection"].startswith("ctxsim_") and m["metric_type"] == "IP"
    assert m["index_type"] == "FLAT" and (milvus_index / "milvus.db").exists()
    assert "engine" not in json.loads((flat_index / "index.json").read_text())  # FAISS index.json unchanged

    with load_index(milvus_index) as mil:
        _same_as_faiss(mil, load_index(flat_index))


def _same_as_faiss(mil, fai):
    assert mil.fingerprint == fai.fingerprint and mil.count == fai.count == mil.backend.ntotal
    assert mil.faiss_index is None
    np.testing.assert_array_equal(mil.embeddings, fai.embeddings)
    q = np.asarray(fai.embeddings[::17], np.float32)
    s_m, i_m = mil.search(q, 10)
    s_f, i_f = fai.search(q, 10)
    np.testing.assert_array_equal(i_m[:, 0], i_f[:, 0])
    np.testing.assert_allclose(s_m, s_f, atol=1e-4)
    # the same neighbour sets (ties in score may order differently)
    assert all(set(a) == set(b) for a, b in zip(i_m[:, :5].tolist(), i_f[:, :5].tolist()))
    assert [it.path for it in mil.items] == [it.path for it in fai.items]


def test_add_then_reopen_in_a_new_process(tmp_path, milvus_index, extra_dir):
    idx = tmp_path / "idx"
    shutil.copytree(milvus_index, idx)
    with load_index(idx) as i:
        n = i.count
    info = add_to_index(idx, extra_dir)
    assert info.added == 40 and info.count == n + 40
    # a new process (a new Milvus Lite client) sees the added rows, searched through the same Index contract
    code = ("import sys, json; from ctxsim.deploy import load_index; i = load_index(sys.argv[1]); "
            "s, ids = i.search(i.embeddings[-3:], 1); "
            "print(json.dumps([i.count, i.backend.ntotal, ids[:, 0].tolist(), i.items[-1].label]))")
    r = subprocess.run([sys.executable, "-c", code, str(idx)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    count, ntotal, top, label = json.loads(r.stdout.strip().splitlines()[-1])
    assert count == ntotal == n + 40 and top == [n + 37, n + 38, n + 39]
    assert label in {p.name for p in extra_dir.iterdir()}
    # `index info` and `search` on the folder, as for FAISS
    r = _cli("index", "info", str(idx), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["engine"] == "milvus"
    some = next(next(extra_dir.iterdir()).iterdir())
    r = _cli("search", str(idx), str(some), "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["neighbors"][0]["path"] == str(some)


def test_other_model_is_refused(tmp_path, milvus_index, other_run_dir, extra_dir, gallery_dir):
    from ctxsim.deploy import search

    some = next(next(gallery_dir.iterdir()).iterdir())
    with pytest.raises(FingerprintMismatch, match=r"index built with model \w+, query model \w+: rebuild"):
        search(milvus_index, [some], k=3, model=other_run_dir)
    r = _cli("search", str(milvus_index), str(some), "--model", str(other_run_dir))
    assert r.returncode != 0 and "query model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a collection written by another model than index.json names: refused when opened
    idx = tmp_path / "idx"
    shutil.copytree(milvus_index, idx)
    meta = json.loads((idx / "index.json").read_text())
    meta["fingerprint"] = "0" * len(meta["fingerprint"])
    (idx / "index.json").write_text(json.dumps(meta))
    with pytest.raises(FingerprintMismatch, match="Milvus collection 'ctxsim_\\w+' holds vectors of model"):
        load_index(idx, verify=False)


def test_hnsw_and_ivf_flat_record_milvus_names(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((300, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    items = [(f"img{i}.png", None) for i in range(300)]
    h = build_from_embeddings(emb, items, "f" * 16, tmp_path / "h", "hnsw", engine="milvus", collection="h")
    assert h.milvus == {"uri": "milvus.db", "collection": "h", "metric_type": "IP", "index_type": "HNSW",
                        "params": {"M": 32, "efConstruction": 80}, "search_params": {"ef": 64}}
    v = build_from_embeddings(emb, items, "f" * 16, tmp_path / "v", "ivf_flat", engine="milvus")
    assert v.index_type == "ivf" and v.milvus is not None and v.milvus["index_type"] == "IVF_FLAT"
    assert set(v.milvus["params"]) == {"nlist"} and set(v.milvus["search_params"]) == {"nprobe"}
    for folder in (tmp_path / "h", tmp_path / "v"):
        with load_index(folder) as idx:
            _, ids = idx.search(emb[:20], 1)
        assert (ids[:, 0] == np.arange(20)).mean() >= 0.9
    with pytest.raises(ConfigError, match="--backend milvus takes --type flat, hnsw or ivf_flat"):
        build_from_embeddings(emb, items, "f" * 16, tmp_path / "x", "ivfpq", engine="milvus")


def _state(idx: Path) -> tuple[int, int, list[int]]:
    """(index.json count, rows Milvus shows through it, ids of a search over every stored vector)."""
    with load_index(idx) as i:
        _, ids = i.search(np.asarray(i.embeddings), 1)
        return i.count, i.backend.ntotal, ids[:, 0].tolist()


@pytest.mark.parametrize("kill", ["index.json:created", "index.json:replaced", "delay"])
def test_killed_add_leaves_old_or_new(tmp_path, milvus_index, extra_dir, kill):
    """SIGKILL `ctxsim index add` after its rows are in Milvus but before index.json (a named fault point), or at
    a random time: the folder shows the old or the new count, never a mix; the next add completes it."""
    idx = tmp_path / "idx"
    shutil.copytree(milvus_index, idx)
    n = json.loads((idx / "index.json").read_text())["count"]
    cmd = [sys.executable, "-m", "ctxsim.cli", "index", "add", str(idx), str(extra_dir)]
    if kill == "delay":
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = float(np.random.default_rng(20261206).uniform(1.0, 3.5))  # an uninterrupted add takes ~4 s
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    else:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "CTXSIM_FAULT": kill})
        assert r.returncode == -signal.SIGKILL, r.stderr
    count, ntotal, top = _state(idx)
    assert count in (n, n + 40) and ntotal == count
    assert top == list(range(count))  # every committed vector finds itself; nothing past the count shows
    if kill == "index.json:created":
        assert count == n  # killed before the commit point: the old generation, the inserted rows invisible
    elif kill == "index.json:replaced":
        assert count == n + 40  # killed just after it: the new generation, whole
    if count == n:
        info = add_to_index(idx, extra_dir)
        assert info.count == n + 40
        count, ntotal, top = _state(idx)
        assert count == ntotal == n + 40 and top == list(range(n + 40))  # no duplicates of the killed insert


def test_serve_reloads_an_added_generation_and_rebuild_replaces_the_collection(tmp_path, milvus_index, extra_dir):
    """`serve` over a Milvus-backed folder: search, then `index add` (same process: a Milvus Lite file has one
    owner process) is picked up by the generation watcher; a rebuild writes a new collection and drops the old."""
    import httpx

    from ctxsim.deploy import create_app

    from serve_helpers import running

    folder = shutil.copytree(milvus_index, tmp_path / "idx")
    new_image = sorted(sorted(extra_dir.iterdir())[0].iterdir())[0]
    upload = {"image": (new_image.name, new_image.read_bytes(), "image/png")}
    with running(create_app(folder, reload_every_s=0.1)) as url:
        n = httpx.get(f"{url}/info", timeout=10).json()["index"]["count"]
        before = httpx.post(f"{url}/search", files=upload, data={"k": "1"}, timeout=30).json()["results"][0]
        assert before["path"] != str(new_image)
        add_to_index(folder, [new_image])
        for _ in range(200):
            if httpx.get(f"{url}/info", timeout=10).json()["index"]["count"] == n + 1:
                break
            time.sleep(0.05)
        after = httpx.post(f"{url}/search", files=upload, data={"k": "1"}, timeout=30).json()["results"][0]
        assert after["path"] == str(new_image) and after["id"] == n
    old = json.loads((folder / "index.json").read_text())["milvus"]["collection"]
    info = build_index([new_image], load_index(folder).info.model, folder, "flat", engine="milvus")
    assert info.milvus is not None and info.milvus["collection"] != old
    from pymilvus import MilvusClient

    from ctxsim.deploy.index_milvus import _client, _close

    uri = str(folder / "milvus.db")
    c = _client(uri)
    try:
        assert isinstance(c, MilvusClient) and c.list_collections() == [info.milvus["collection"]]
    finally:
        _close(c, uri)


def test_cli_build_with_backend_milvus(tmp_path, gallery_dir, run_dir):
    from typer.testing import CliRunner

    from ctxsim.cli.app import app

    out = tmp_path / "idx"
    r = CliRunner().invoke(app, ["index", "build", str(gallery_dir), "--model", str(run_dir), "--out", str(out),
                                 "--backend", "milvus", "--type", "hnsw", "--collection", "gallery", "--uri",
                                 "g.db"])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "index.json").read_text())
    assert meta["milvus"]["uri"] == "g.db" and meta["milvus"]["collection"] == "gallery"
    assert meta["milvus"]["index_type"] == "HNSW" and (out / "g.db").exists()
    r = CliRunner().invoke(app, ["index", "build", str(gallery_dir), "--model", str(run_dir), "--out",
                                 str(tmp_path / "x"), "--backend", "milvus", "--type", "ivfpq"])
    assert isinstance(r.exception, ConfigError) and "takes --type flat, hnsw or ivf_flat" in str(r.exception)


def test_verify_checks_the_collection(milvus_index):
    from ctxsim.deploy.verify import verify

    report = verify(milvus_index)
    assert report.ok, [c.to_dict() for c in report.failures]
    assert any(c.item.startswith("milvus:ctxsim_") and c.status == "ok" for c in report.checks)
