"""Bounded image decoding at the deploy entry points: `ctxsim serve` over real HTTP (a refused image gets a JSON
413/422 naming the limit; one bad image in a dynamic batch fails only its own request), `ctxsim search` and
`ctxsim index build` (one line and exit 2, or skipped and reported)."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from serve_helpers import png, running, tiny_index  # noqa: E402


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, other_run_dir):
    return tiny_index(tmp_path_factory.mktemp("limits"), other_run_dir)


def _gallery(index_dir):
    from ctxsim.deploy import load_index

    return [it.path for it in load_index(index_dir).items]


def _concurrently(url, uploads, path="/search"):
    """POST every upload at once (a barrier), each from its own client; returns [(status, json)] in order."""
    barrier = threading.Barrier(len(uploads))
    out: list = [None] * len(uploads)

    def client(i):
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            r = c.post(f"{url}{path}", files={"image": ("q.png", uploads[i], "image/png")}, data={"k": "3"})
            out[i] = (r.status_code, r.json(), r.headers.get("content-type", ""))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(uploads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_the_565_byte_upload_gets_422_at_once(index_dir):
    import io

    from PIL import Image

    from ctxsim.deploy import create_app

    buf = io.BytesIO()
    Image.new("L", (500_000, 1), 128).save(buf, format="PNG")  # the tracker's 565-byte file
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with running(create_app(index_dir, reload_every_s=0, device="cpu", max_pixels=1_000_000)) as url:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/embed", files={"image": ("t.png", buf.getvalue(), "image/png")}, timeout=30)
        took = time.perf_counter() - t0
        assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text
        body = r.json()
        assert body["limit"] == "max_aspect_ratio" and body["maximum"] == 50 and body["value"] == 500_000
        assert "max_aspect_ratio" in body["error"] and "\n" not in body["error"]
        assert took < 1.0, took
        r = httpx.post(f"{url}/search", files={"image": ("p.png", png(1200, 1000), "image/png")}, timeout=30)
        assert r.status_code == 413 and r.json()["limit"] == "max_pixels" and r.json()["maximum"] == 1_000_000
        limits = httpx.get(f"{url}/info", timeout=10).json()["limits"]
        assert limits["max_pixels"] == 1_000_000 and limits["max_aspect_ratio"] == 50
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mb < 300, f"peak RSS grew by {grew_mb:.0f} MB"  # resizing it would have taken ~1 GB


def test_one_bad_upload_among_concurrent_good_ones(index_dir):
    """An image refused by the aspect limit, sent at the same moment as six good ones: only it fails."""
    from ctxsim.deploy import create_app

    paths = _gallery(index_dir)[::2][:6]
    uploads = [Path(p).read_bytes() for p in paths]
    uploads.insert(3, png(3000, 2, seed=7))
    app = create_app(index_dir, reload_every_s=0, device="cpu", max_batch=16, batch_wait_ms=100)
    with running(app) as url:
        out = _concurrently(url, uploads)
    statuses = [o[0] for o in out]
    assert statuses == [200, 200, 200, 422, 200, 200, 200], out
    assert out[3][1]["limit"] == "max_aspect_ratio" and out[3][2] == "application/json"
    good = [o for i, o in enumerate(out) if i != 3]
    assert [o[1]["results"][0]["path"] for o in good] == paths  # each client got its own answer


class _Poisoned:
    """An Embedder that cannot preprocess images of one size (a stand-in for any per-image failure in a batch)."""

    def __init__(self, inner, size):
        self.inner, self.size, self.calls = inner, size, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, images, progress=None):
        images = list(images)
        self.calls.append(len(images))
        if any(im.size == self.size for im in images):
            from ctxsim.errors import DataError

            raise DataError(f"cannot preprocess a {self.size[0]}x{self.size[1]} image (test)")
        return self.inner.embed(images, progress)


def test_one_image_failing_in_a_batch_fails_only_its_request(index_dir, other_run_dir):
    """The batcher embeds a batch in one call; when that call fails because of one image, each image is embedded
    alone: the bad request gets its own error (400, JSON), the others their results."""
    from ctxsim.deploy import Embedder, create_app

    model = _Poisoned(Embedder.from_artifact(other_run_dir, device="cpu"), (27, 29))
    paths = _gallery(index_dir)[1::2][:6]
    uploads = [Path(p).read_bytes() for p in paths]
    uploads.insert(2, png(27, 29, seed=3))
    app = create_app(index_dir, model=model, reload_every_s=0, max_batch=16, batch_wait_ms=200)
    with running(app) as url:
        out = _concurrently(url, uploads)
        stats = httpx.get(f"{url}/info", timeout=10).json()["batching"]
    assert [o[0] for o in out] == [200, 200, 400, 200, 200, 200, 200], out
    assert "cannot preprocess" in out[2][1]["error"] and out[2][2] == "application/json"
    good = [o for i, o in enumerate(out) if i != 2]
    assert [o[1]["results"][0]["path"] for o in good] == paths
    assert stats["max_batch_seen"] > 1 and max(model.calls) > 1, (stats, model.calls)  # they did share a batch
    assert stats["errors"] >= 1


def test_batcher_prepares_each_image_on_its_own(index_dir, other_run_dir):
    """The Python API path (images handed to the batcher directly): an over-wide image fails alone."""
    from PIL import Image

    from ctxsim.deploy import Embedder, load_index
    from ctxsim.deploy.serve import Batcher
    from ctxsim.errors import ImageRefused

    index = load_index(index_dir)
    batcher = Batcher(Embedder.from_artifact(other_run_dir, device="cpu"), index)
    good = [Image.open(p) for p in _gallery(index_dir)[:3]]
    out = batcher._work([(good[0], 2), (Image.new("L", (100_000, 1)), 2), (good[1], None), (good[2], 1)])
    assert isinstance(out[1], ImageRefused) and out[1].limit == "max_aspect_ratio"
    assert out[0][1][0]["path"] == good[0].filename and out[3][1][0]["path"] == good[2].filename
    assert out[2][1] is None and np.isfinite(out[2][0]).all() and out[2][0].shape == (64,)


def _ctxsim(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxsim.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})


def test_cli_one_line_or_skipped_and_reported(tmp_path, index_dir, other_run_dir):
    wide = tmp_path / "wide.png"
    wide.write_bytes(png(4000, 3))
    r = _ctxsim("search", index_dir, wide, "-k", "2")
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(wide) in err and "max_aspect_ratio" in err
    gallery = tmp_path / "gallery" / "c0"
    gallery.mkdir(parents=True)
    for i in range(3):
        (gallery / f"{i}.png").write_bytes(png(24, 24, seed=i))
    (gallery / "wide.png").write_bytes(png(4000, 3))
    r = _ctxsim("index", "build", tmp_path / "gallery", "--model", other_run_dir, "--out", tmp_path / "idx")
    assert r.returncode == 0, r.stderr
    assert "not indexed (1)" in r.stderr and "wide.png" in r.stderr and "max_aspect_ratio" in r.stderr, r.stderr
    from ctxsim.deploy import read_index_info

    assert read_index_info(tmp_path / "idx").count == 3
