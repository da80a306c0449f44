"""Index folders: build/add/search round trip, exactness, metrics through the index, fingerprints, crash safety."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ctxsim.deploy import Index, add_to_index, build_index, check_recall, load_index, read_index_info
from ctxsim.deploy.index import default_params
from ctxsim.errors import ArtifactError, ConfigError, FingerprintMismatch


def test_build_add_search_round_trip(tmp_path, gallery_dir, extra_dir, run_dir):
    out = tmp_path / "idx"
    seen = []
    info = build_index(gallery_dir, run_dir, out, "flat", progress=lambda d, t: seen.append((d, t)))
    assert info.count == 20 * len(list(gallery_dir.iterdir())) and info.dim == 64 and info.skipped == []
    assert seen[-1] == (info.count, info.count)
    meta = json.loads((out / "index.json").read_text())
    for key in ("fingerprint", "dim", "metric", "index_type", "params", "count", "ctxsim_version", "created"):
        assert key in meta
    assert meta["metric"] == "ip" and meta["index_type"] == "flat" and meta["count"] == info.count

    idx = load_index(out)
    assert [it.id for it in idx.items] == list(range(info.count))
    assert {it.label for it in idx.items} == {p.name for p in gallery_dir.iterdir()}
    first_gen = meta["generation"]

    added = add_to_index(out, extra_dir)
    assert added.added == 40 and added.count == info.count + 40
    idx2 = load_index(out)
    assert [it.id for it in idx2.items] == list(range(info.count + 40))  # ids continue
    assert all(it.label in {p.name for p in extra_dir.iterdir()} for it in idx2.items[info.count:])
    assert idx2.info.generation == first_gen + 1
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == sorted(["index.json", *idx2.info.files.values()])  # superseded generation deleted

    # an added image finds itself first, with the old ids unchanged
    from ctxsim.deploy import search

    q = idx2.items[info.count + 3]
    res = search(out, [q.path], k=5)
    assert res[0].neighbors[0].id == q.id and res[0].neighbors[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(res[0].neighbors) == 5
    np.testing.assert_array_equal(idx2.embeddings[: info.count], idx.embeddings)


@pytest.mark.parametrize("index_type", ["flat", "torch"])
def test_exact_index_matches_brute_force(tmp_path, flat_index, index_type):
    stored = np.asarray(load_index(flat_index).embeddings)
    idx = Index.from_embeddings(stored, index_type)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((25, stored.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q = np.concatenate([q, stored[::17]])
    k = 10
    scores, ids = idx.search(q, k)
    sims = q @ stored.T
    want = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, want, 1), rtol=0, atol=1e-5)


def test_recall_at_1_through_index_equals_retrieval_metrics(flat_index):
    from ctxsim.evaluate import retrieval_metrics

    idx = load_index(flat_index)
    emb = np.asarray(idx.embeddings)
    labels = np.array([it.label for it in idx.items])
    _, ids = idx.search(emb, 2)
    nearest = np.where(ids[:, 0] == np.arange(len(ids)), ids[:, 1], ids[:, 0])  # leave-one-out: drop self
    r1_index = float(np.mean(labels[nearest] == labels))
    r1_eval = retrieval_metrics(emb, labels, ks=(1,))["R@1"]
    assert r1_index == pytest.approx(r1_eval, abs=1e-12)
    assert 0.0 < r1_index < 1.0  # an untrained net: neither trivially perfect nor broken


def test_other_model_is_refused(tmp_path, flat_index, other_run_dir, extra_dir, gallery_dir):
    from ctxsim.deploy import search

    idx = load_index(flat_index)
    some = next(gallery_dir.iterdir()).iterdir().__next__()
    with pytest.raises(FingerprintMismatch, match=r"index built with model \w+, query model \w+: rebuild"):
        search(flat_index, [some], k=3, model=other_run_dir)
    copy = tmp_path / "copy"
    shutil.copytree(flat_index, copy)
    with pytest.raises(FingerprintMismatch):
        add_to_index(copy, extra_dir, other_run_dir)
    assert load_index(copy).count == idx.count


@pytest.mark.parametrize("how", ["index.json", "write_index"])
def test_interrupted_save_keeps_the_old_index(tmp_path, flat_index, extra_dir, monkeypatch, how):
    import faiss

    out = tmp_path / "idx"
    shutil.copytree(flat_index, out)
    before = load_index(out)
    old_files = set(before.info.files.values())

    class Boom(RuntimeError):
        pass

    if how == "index.json":  # the new index/items/embeddings files land, the crash hits before index.json
        real = os.replace
        landed = []

        def replace(src, dst, *a, **k):
            if Path(dst).name == "index.json":
                raise Boom("crash before the commit point")
            landed.append(Path(dst).name)
            return real(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)
    else:
        def write_index(*a, **k):
            raise Boom("disk full")

        monkeypatch.setattr(faiss, "write_index", write_index)
    with pytest.raises(Boom):
        add_to_index(out, extra_dir)
    monkeypatch.undo()
    if how == "index.json":
        assert any(n.startswith("index.") and n.endswith(".faiss") for n in landed)  # a newer file did land
    after = load_index(out)  # hashes verified
    assert after.count == before.count
    assert set(after.info.files.values()) == old_files and all((out / f).exists() for f in old_files)
    np.testing.assert_array_equal(after.embeddings, before.embeddings)
    # the next save succeeds and cleans up the orphaned generation
    info = add_to_index(out, extra_dir)
    assert info.count == before.count + 40
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        sorted(["index.json", *info.files.values()])


def test_damaged_files_are_detected(tmp_path, flat_index):
    out = tmp_path / "idx"
    shutil.copytree(flat_index, out)
    info = read_index_info(out)
    with open(out / info.files["items"], "a", encoding="utf-8") as f:
        f.write('{"id": 999999, "path": "x", "label": null}\n')
    with pytest.raises(ArtifactError, match="sha256"):
        load_index(out)
    (out / "index.json").unlink()
    with pytest.raises(ArtifactError, match="not an index folder"):
        load_index(out)


# ivfpq: 8-bit PQ codes of an untrained model's crowded embeddings (240 items): a sanity floor, chance is 10/240.
# 0.28 on the shipped sample's 28 px drawings (0.3+ on full-size Omniglot drawings resized by the transform).
@pytest.mark.parametrize("index_type,min_recall", [("ivf", 0.95), ("hnsw", 0.95), ("ivfpq", 0.2)])
def test_approximate_index_recall(tmp_path, gallery_dir, run_dir, index_type, min_recall):
    info = build_index(gallery_dir, run_dir, tmp_path / index_type, index_type)
    assert set(default_params(index_type, info.count, info.dim)) <= set(info.params)
    r = check_recall(tmp_path / index_type, k=10)
    assert r["k"] == 10 and r["queries"] == info.count and r["index_type"] == index_type
    assert min_recall <= r["recall"] <= 1.0
    idx = load_index(tmp_path / index_type)
    _, ids = idx.search(np.asarray(idx.embeddings[:5]), 3)
    assert ids.shape == (5, 3)


def test_default_params():
    p = default_params("ivf", 100_000, 512)
    assert p["nlist"] == round(4 * 100_000 ** 0.5) and 1 <= p["nprobe"] <= p["nlist"]
    assert default_params("ivf", 200, 64)["nlist"] == 200 // 39  # >= 39 training points per list
    pq = default_params("ivfpq", 100_000, 512)
    assert 512 % pq["m"] == 0 and pq["nbits"] == 8
    assert 96 % default_params("ivfpq", 5000, 96)["m"] == 0
    assert default_params("hnsw", 10, 8) == {"M": 32, "efConstruction": 80, "efSearch": 64}
    with pytest.raises(ConfigError):
        Index.from_embeddings(np.eye(4, dtype=np.float32), "ivf", {"nlist": 10})
    with pytest.raises(ConfigError, match="unknown index type"):
        default_params("lsh", 10, 8)


def test_search_clips_k_and_checks_dims():
    emb = np.eye(3, 8, dtype=np.float32)
    idx = Index.from_embeddings(emb, "flat")
    _s, i = idx.search(emb[:1], 10)
    assert i.shape == (1, 3) and i[0, 0] == 0
    with pytest.raises(ConfigError, match="shape"):
        idx.search(np.ones((1, 5), np.float32), 1)
