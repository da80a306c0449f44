"""The item endpoints behind the search page, over real HTTP: thumbnails, item metadata, "more like this", /model.

A real uvicorn server on loopback (token required) serves a flat index over real Omniglot drawings plus two larger
generated photos (a JPEG and a PNG, to see the server shrink them).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import types
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from serve_helpers import running  # noqa: E402

TOKEN = "thumb-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _photo(w: int, h: int, seed: int) -> Image.Image:
    import numpy as np

    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // w + seed) % 256, (y * 255 // h) % 256, ((x + y) * 7 + seed) % 256], -1)
    return Image.fromarray(rgb.astype("uint8"), "RGB")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, gallery_dir) -> Path:
    """Two Omniglot characters (40 drawings, 28 px) and photos/: wide.jpg 640x400, tall.png 300x900, spare.jpg."""
    root = tmp_path_factory.mktemp("thumb_gallery")
    for cls in sorted(gallery_dir.iterdir())[:2]:
        shutil.copytree(cls, root / cls.name)
    (root / "photos").mkdir()
    _photo(640, 400, 1).save(root / "photos" / "wide.jpg", quality=90)
    _photo(300, 900, 2).save(root / "photos" / "tall.png")
    _photo(500, 500, 3).save(root / "photos" / "spare.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, gallery, run_dir) -> Path:
    from ctxsim.deploy import build_index

    out = tmp_path_factory.mktemp("thumb_index")
    build_index(gallery, run_dir, out, "flat")
    return out


@pytest.fixture(scope="module")
def items(index_dir) -> dict[str, int]:
    """Item id by file name (photos) or 'class/name' (drawings)."""
    from ctxsim.deploy import load_index

    out = {}
    for it in load_index(index_dir).items:
        p = Path(it.path)
        out[p.name if p.parent.name == "photos" else f"{p.parent.name}/{p.name}"] = it.id
    return out


def _app(index, token=TOKEN):
    from ctxsim.deploy import create_app

    return create_app(index, token=token, max_batch=8, batch_wait_ms=2, reload_every_s=0, device="cpu")


@pytest.fixture(scope="module")
def url(index_dir):
    with running(_app(index_dir)) as u:
        yield u


def _get(url: str, path: str, **kw) -> httpx.Response:
    return httpx.get(f"{url}{path}", headers={**AUTH, **kw.pop("headers", {})}, timeout=30, **kw)


def _drawing(items: dict, n: int) -> int:
    """The id of the n-th drawing (by id): each test that moves or rewrites a file uses its own."""
    return sorted(v for k, v in items.items() if "/" in k)[n]


def test_item_metadata_is_the_item_table(url, index_dir):
    from ctxsim.deploy import load_index

    index = load_index(index_dir)
    for it in (index.items[0], index.items[-1]):
        r = _get(url, f"/items/{it.id}")
        assert r.status_code == 200, r.text
        assert r.json() == {"id": it.id, "path": it.path, "label": it.label, "generation": index.info.generation}


def test_thumbnails_are_shrunk_on_the_server(url, items, gallery):
    r = _get(url, f"/items/{items['wide.jpg']}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and im.size == (256, 160)  # 640x400 at most 256 a side, aspect kept
    assert len(r.content) < (gallery / "photos" / "wide.jpg").stat().st_size

    r = _get(url, f"/items/{items['tall.png']}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (85, 256)

    r = _get(url, f"/items/{_drawing(items, 0)}/thumbnail")  # a 28 px drawing is never enlarged
    im = Image.open(io.BytesIO(r.content))
    assert r.status_code == 200 and im.format == "PNG" and im.size == (28, 28) and im.mode == "L"


def test_cache_control_etag_and_304(url, items):
    path = f"/items/{items['tall.png']}/thumbnail"
    r = _get(url, path)
    assert r.status_code == 200
    assert r.headers["cache-control"] == "private, no-cache"  # token-protected, revalidated with the ETag
    etag = r.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]+"', etag)
    again = _get(url, path, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert _get(url, path, headers={"If-None-Match": '"other"'}).status_code == 200
    assert _get(url, f"/items/{items['wide.jpg']}/thumbnail").headers["etag"] != etag


@pytest.mark.parametrize("item_id", ["-1", "-100", "43", "1000", str(2**63), str(10**30)])
def test_unknown_ids_are_404(url, items, item_id):
    assert len(items) == 43  # ids 0..42
    for path in (f"/items/{item_id}", f"/items/{item_id}/thumbnail", f"/items/{item_id}/similar"):
        r = _get(url, path)
        assert r.status_code == 404, (path, r.text)
        assert r.headers["content-type"] == "application/json"
        assert f"no item {item_id} in the served index" in r.json()["error"]


@pytest.mark.parametrize("item_id", ["abc", "1.5", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"])
def test_no_paths_only_ids(url, item_id):
    r = _get(url, f"/items/{item_id}/thumbnail")
    assert r.status_code in (404, 422), r.text  # 422: not an integer; 404: no such route
    assert r.headers["content-type"] == "application/json" and "error" in r.json()


def test_a_moved_file_gets_a_placeholder(url, items, gallery, index_dir):
    from ctxsim.deploy import load_index

    item_id = _drawing(items, 1)
    src = Path(load_index(index_dir).items[item_id].path)
    moved = src.with_name(src.name + ".moved")
    src.rename(moved)
    try:
        r = _get(url, f"/items/{item_id}/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-ctxsim-placeholder"] == "missing"
        assert r.headers["cache-control"] == "no-store" and "etag" not in r.headers
        assert Image.open(io.BytesIO(r.content)).size == (256, 256)
        assert _get(url, f"/items/{item_id}").status_code == 200  # the item itself is still in the index
    finally:
        moved.rename(src)
    r = _get(url, f"/items/{item_id}/thumbnail")  # placeholders are not cached: the file is back
    assert "x-ctxsim-placeholder" not in r.headers and Image.open(io.BytesIO(r.content)).size == (28, 28)


def test_a_corrupt_file_gets_a_placeholder(url, items, index_dir):
    from ctxsim.deploy import load_index

    item_id = _drawing(items, 2)
    src = Path(load_index(index_dir).items[item_id].path)
    original = src.read_bytes()
    src.write_bytes(original[:40])  # truncated PNG
    try:
        r = _get(url, f"/items/{item_id}/thumbnail")
        assert r.status_code == 200 and r.headers["x-ctxsim-placeholder"] == "unreadable"
    finally:
        src.write_bytes(original)


def test_decoding_is_bounded_by_the_image_limits(url, items, monkeypatch):
    monkeypatch.setenv("CTXSIM_MAX_IMAGE_PIXELS", "100000")  # spare.jpg is 500x500 = 250,000 pixels
    r = _get(url, f"/items/{items['spare.jpg']}/thumbnail")
    assert r.status_code == 200 and r.headers["x-ctxsim-placeholder"] == "unreadable"
    monkeypatch.delenv("CTXSIM_MAX_IMAGE_PIXELS")
    r = _get(url, f"/items/{items['spare.jpg']}/thumbnail")
    assert r.status_code == 200 and "x-ctxsim-placeholder" not in r.headers
    assert Image.open(io.BytesIO(r.content)).size == (256, 256)


def test_thumbnails_are_cached_per_generation(url, items, index_dir):
    from ctxsim.deploy import load_index

    item_id = _drawing(items, 3)
    src = Path(load_index(index_dir).items[item_id].path)
    first = _get(url, f"/items/{item_id}/thumbnail").content
    original = src.read_bytes()
    Image.new("L", (28, 28), 128).save(src)  # the file changes, the index generation does not
    try:
        assert _get(url, f"/items/{item_id}/thumbnail").content == first  # served from the LRU
    finally:
        src.write_bytes(original)


def test_thumbnail_cache_is_bounded_by_bytes():
    from ctxsim.deploy.page import ThumbnailCache

    cache = ThumbnailCache(max_bytes=100)
    for i in range(5):
        cache.put(i, (b"x" * 30, "image/png"))
    assert len(cache) == 3 and cache.size == 90 and cache.get(0) is None and cache.get(4) is not None
    cache.get(2)  # most recently used now
    cache.put(5, (b"y" * 30, "image/png"))
    assert cache.get(3) is None and cache.get(2) is not None
    cache.put("big", (b"z" * 101, "image/png"))  # larger than the whole cache: not kept
    assert cache.get("big") is None and cache.size <= 100


def test_more_like_this_uses_the_stored_embedding(url, items):
    item_id = _drawing(items, 5)
    r = _get(url, f"/items/{item_id}/similar", params={"k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 5 and len(body["results"]) == 5 and body["index_type"] == "flat"
    first = body["results"][0]
    assert first["id"] == item_id and first["rank"] == 1 and first["score"] == pytest.approx(1.0, abs=1e-4)
    assert body["query"]["id"] == item_id and body["query"]["path"] == first["path"]
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert _get(url, "/info").json()["fingerprint"] == body["fingerprint"]
    for k in (0, -1, 100_000, "x"):
        r = _get(url, f"/items/{item_id}/similar", params={"k": k})
        assert r.status_code == 422 and "k" in r.json()["error"], (k, r.text)
    assert len(_get(url, f"/items/{item_id}/similar").json()["results"]) == 10  # the server's default k


def test_more_like_this_without_stored_embeddings_embeds_the_file(index_dir, items):
    """An index that keeps no embeddings: the item's file is embedded (through the batcher) instead."""
    from ctxsim.deploy import load_index
    from ctxsim.errors import ArtifactError

    index = load_index(index_dir)

    class NoEmbeddings(type(index)):
        @property
        def embeddings(self):
            raise ArtifactError("this index keeps no embeddings; rebuild it")

    index.__class__ = NoEmbeddings
    item_id = items["wide.jpg"]
    with running(_app(index, token=None)) as u:
        r = httpx.get(f"{u}/items/{item_id}/similar", params={"k": 3}, timeout=30)
        assert r.status_code == 200, r.text
        first = r.json()["results"][0]
        assert first["id"] == item_id and first["score"] == pytest.approx(1.0, abs=1e-3)


def test_the_token_guards_the_data_not_the_page(url, items):
    for path in ("/items/0", "/items/0/thumbnail", "/items/0/similar", "/model", "/items/999/thumbnail"):
        r = httpx.get(f"{url}{path}", timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        r = httpx.get(f"{url}{path}", headers={"Authorization": "Bearer wrong"}, timeout=30)
        assert r.status_code == 401, path
    for path in ("/items/0", "/items/0/thumbnail", "/items/0/similar", "/model"):
        assert _get(url, path).status_code == 200, path
    for path, media in (("/", "text/html"), ("/static/page.js", "text/javascript"), ("/static/page.css", "text/css")):
        r = httpx.get(f"{url}{path}", timeout=30)  # no token: the page holds no data
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), path
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{url}/static/other.js", timeout=30).status_code == 401  # only the page's own files are open


def test_the_page_loads_nothing_from_elsewhere():
    """Air-gapped boxes: no CDN, no external font, no absolute URL in the shipped page."""
    from importlib import resources

    static = resources.files("ctxsim.deploy") / "static"
    names = sorted(p.name for p in static.iterdir())
    assert names == ["index.html", "page.css", "page.js"]
    for name in names:
        text = (static / name).read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text and "<script>" not in text, name  # nothing inline: the CSP allows 'self' only


def test_model_reports_the_parity_verdict_for_its_bytes(url, tmp_path):
    from ctxsim.deploy.page import describe_model

    body = _get(url, "/model").json()
    assert body["kind"] == "torch" and body["precision"] == "fp32" and body["backend"].startswith("torch")
    assert body["parity"]["verdict"] == "reference"
    assert body["fingerprint"] == _get(url, "/info").json()["fingerprint"]

    onnx = tmp_path / "model.fp16.onnx"
    onnx.write_bytes(b"not really onnx")
    record = {"passed": False, "failures": ["R@1 dropped by 0.05"], "precision": "fp16",
              "sha256": hashlib.sha256(onnx.read_bytes()).hexdigest()}
    (tmp_path / "parity.json").write_text(json.dumps({onnx.name: record}))
    served = types.SimpleNamespace(kind="onnx", artifact=onnx, fingerprint="f" * 16, backend="onnxruntime:CPU",
                                   contract={"precision": "fp16"})
    d = describe_model(served)
    assert d["precision"] == "fp16" and d["artifact"] == onnx.name
    assert d["parity"] == {"verdict": "failed", "failures": ["R@1 dropped by 0.05"], "detail": "",
                           "precision": "fp16"}
    onnx.write_bytes(b"other bytes")  # the record is of other bytes now: no verdict, never "passed"
    d = describe_model(served)
    assert d["parity"]["verdict"] == "none" and "other bytes" in d["parity"]["detail"]
    bf16 = types.SimpleNamespace(kind="torch", artifact=tmp_path, fingerprint="f", backend="torch:cuda:bf16",
                                 contract={})
    assert describe_model(bf16)["precision"] == "bf16" and describe_model(bf16)["parity"]["verdict"] == "none"
