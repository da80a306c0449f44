"""`ctxsim embed`: Parquet shards + manifest, in-process and with a local Ray Data pipeline; `index build
--from-embeddings`; foreign-model shards refused; resume."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ctxsim.deploy import load_index
from ctxsim.deploy.embed_shards import MANIFEST, embed_to_shards, read_embeddings
from ctxsim.deploy.index import build_from_embeddings
from ctxsim.errors import ArtifactError, FingerprintMismatch

pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'ctxsim[ray]')")


@pytest.fixture(scope="module")
def gallery_list(tmp_path_factory, gallery_dir) -> Path:
    """gallery_dir's images as a list file, with one unreadable image in the middle."""
    root = tmp_path_factory.mktemp("list")
    bad = root / "broken.png"
    bad.write_bytes(b"not an image")
    from ctxsim.deploy.gallery import open_gallery

    lines = [f"{it.path} {it.label}" for it in open_gallery(gallery_dir).items]  # the folder gallery's order
    lines.insert(57, f"{bad} broken")
    (root / "gallery.txt").write_text("\n".join(lines) + "\n")
    return root / "gallery.txt"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, gallery_list, run_dir) -> Path:
    out = tmp_path_factory.mktemp("emb") / "emb"
    embed_to_shards(gallery_list, run_dir, out, shard_size=100, batch_size=32)
    return out


def test_shards_hold_the_in_process_embeddings(shards, gallery_list, run_dir, flat_index):
    m = json.loads((shards / MANIFEST).read_text())
    assert m["gallery_size"] == 241 and m["count"] == 240 and m["dim"] == 64 and len(m["shards"]) == 3
    assert [s["rows"] for s in m["shards"]] == [99, 100, 41]
    assert len(m["skipped"]) == 1 and m["skipped"][0][0].endswith("broken.png")
    e = read_embeddings(shards)
    ref = load_index(flat_index)
    assert e.fingerprint == ref.fingerprint
    assert [p for p, _ in e.items] == [it.path for it in ref.items]  # same rows, same order (by path)
    np.testing.assert_allclose(e.embeddings, ref.embeddings, atol=1e-6)
    # an index built from the shards is the index built from the gallery
    idx = build_from_embeddings(e.embeddings, e.items, e.fingerprint, shards.parent / "idx", "flat")
    got = load_index(idx.path)
    np.testing.assert_array_equal(got.embeddings, ref.embeddings)
    assert [(it.path, it.label) for it in got.items] == [(it.path, it.label) for it in ref.items]


def test_foreign_model_shard_is_refused(tmp_path, shards, gallery_list, other_run_dir):
    other = tmp_path / "other"
    embed_to_shards(gallery_list, other_run_dir, other, shard_size=100)
    with pytest.raises(FingerprintMismatch, match="expected model"):
        read_embeddings(other, fingerprint=read_embeddings(shards).fingerprint)
    mixed = tmp_path / "mixed"
    shutil.copytree(shards, mixed)
    shutil.copy(other / "shard-00001.parquet", mixed / "shard-00001.parquet")
    with pytest.raises(ArtifactError, match="sha256"):
        read_embeddings(mixed)
    # even with the manifest's sha256 updated to the foreign shard: its model is not the manifest's
    from ctxsim.io import sha256_file

    m = json.loads((mixed / MANIFEST).read_text())
    m["shards"][1]["sha256"] = sha256_file(mixed / "shard-00001.parquet")
    (mixed / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FingerprintMismatch, match="shards of two models cannot make one index"):
        read_embeddings(mixed)


def test_resume_keeps_complete_shards(tmp_path, shards, gallery_list, run_dir):
    out = tmp_path / "emb"
    shutil.copytree(shards, out)
    (out / MANIFEST).unlink()  # as if killed before the manifest: one shard missing, one damaged
    (out / "shard-00001.parquet").unlink()
    (out / "shard-00002.parquet").write_bytes(b"torn")
    kept = (out / "shard-00000.parquet").stat().st_mtime_ns
    time.sleep(0.01)
    embed_to_shards(gallery_list, run_dir, out, shard_size=100, batch_size=32)
    assert (out / "shard-00000.parquet").stat().st_mtime_ns == kept
    assert json.loads((out / MANIFEST).read_text())["shards"] == json.loads((shards / MANIFEST).read_text())["shards"]


def test_resume_embeds_again_a_shard_whose_images_changed(tmp_path, shards, gallery_list, run_dir):
    """A rerun over an edited list keeps only the shards whose images are still the same."""
    out = tmp_path / "emb"
    shutil.copytree(shards, out)
    lines = gallery_list.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]  # shard 0 now lists its first two images the other way round
    edited = tmp_path / "edited.txt"
    edited.write_text("\n".join(lines) + "\n")
    kept = (out / "shard-00001.parquet").stat().st_mtime_ns
    time.sleep(0.01)
    embed_to_shards(edited, run_dir, out, shard_size=100, batch_size=32)
    assert (out / "shard-00001.parquet").stat().st_mtime_ns == kept
    embed_to_shards(edited, run_dir, tmp_path / "fresh", shard_size=100, batch_size=32)
    again, fresh = read_embeddings(out), read_embeddings(tmp_path / "fresh")
    assert again.items == fresh.items
    np.testing.assert_array_equal(again.embeddings, fresh.embeddings)


@pytest.mark.ray
def test_ray_pipeline_equals_in_process(tmp_path, shards, gallery_list, run_dir):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'ctxsim[ray]')")
    import ray

    out = tmp_path / "emb"
    try:
        m = embed_to_shards(gallery_list, run_dir, out, ray="local", workers=2, shard_size=100, batch_size=32)
    finally:
        ray.shutdown()
    assert m["ray"] == "local" and m["count"] == 240 and len(m["skipped"]) == 1
    a, b = read_embeddings(out), read_embeddings(shards)
    assert a.items == b.items and a.fingerprint == b.fingerprint
    cos = (a.embeddings * b.embeddings).sum(1) / (
        np.linalg.norm(a.embeddings, axis=1) * np.linalg.norm(b.embeddings, axis=1))
    assert cos.min() >= 0.9999


def test_embed_and_index_build_from_embeddings_cli(tmp_path, shards, gallery_list, run_dir, flat_index):
    from typer.testing import CliRunner

    from ctxsim.cli.app import app

    r = CliRunner().invoke(app, ["embed", str(gallery_list), "--model", str(run_dir), "--out", str(tmp_path / "e"),
                                 "--shard-size", "100"])
    assert r.exit_code == 0, r.output
    assert "embedded 240 of 241 image(s) into 3 shard(s)" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["index", "build", "--from-embeddings", str(tmp_path / "e"), "--out",
                                 str(tmp_path / "i")])
    assert r.exit_code == 0, r.output
    got, ref = load_index(tmp_path / "i"), load_index(flat_index)
    assert got.fingerprint == ref.fingerprint and got.count == ref.count
    assert got.info.model == ref.info.model  # the model travels with the shards: `search` finds it


@pytest.mark.parametrize("changes, words", [
    ({"dim": "64"}, "manifest.dim must be an integer, got '64'"),
    ({"shards": [{"file": "shard-00000.parquet"}]}, "manifest.shards[0] lacks 'sha256'"),
    ({"skipped": [["a.png"]]}, "manifest.skipped[0] must be a list of 2 values"),
    ({"dim": 0}, "is not a ctxsim embeddings manifest"),
])
def test_a_damaged_embeddings_manifest_is_one_line(tmp_path, shards, changes, words):
    out = tmp_path / "emb"
    shutil.copytree(shards, out)
    m = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**m, **changes}))
    with pytest.raises(ArtifactError) as e:
        read_embeddings(out)
    assert words in str(e.value) and "\n" not in str(e.value)
