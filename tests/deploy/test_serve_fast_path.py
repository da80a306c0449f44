"""The server's request path (issue 15): raw image bodies, a lone request that does not wait for a batch, the
batcher's /metrics counters, and served neighbours equal to Index.search on the same embeddings."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from serve_helpers import png, running  # noqa: E402

MAX_UPLOAD = 100_000


@pytest.fixture(scope="module")
def server(flat_index):
    from ctxsim.deploy import create_app

    app = create_app(flat_index, reload_every_s=0, device="cpu", max_upload_bytes=MAX_UPLOAD, max_batch=16,
                     batch_wait_ms=2000)
    with running(app) as url:
        yield url, app


def _queries(gallery_dir, n=6):
    return sorted(gallery_dir.rglob("*.png"))[::11][:n]


def test_served_neighbours_equal_index_search(server, gallery_dir, flat_index):
    """Each served answer is what Index.search returns for the in-process embedding of the same upload."""
    from ctxsim.deploy import load_index
    from ctxsim.deploy.batcher import decode_upload

    url, app = server
    index = load_index(flat_index)
    embedder = app.state.batcher.embedder
    for path in _queries(gallery_dir):
        data = path.read_bytes()
        body = httpx.post(f"{url}/search", files={"image": ("q.png", data, "image/png")}, data={"k": "8"},
                          timeout=30).json()
        scores, ids = index.search(embedder.embed([decode_upload(data, 10**8)]), 8)
        assert [h["id"] for h in body["results"]] == ids[0].tolist(), path
        np.testing.assert_allclose([h["score"] for h in body["results"]], scores[0], atol=1e-5)
        assert [h["path"] for h in body["results"]] == [index.items[i].path for i in ids[0]]


def test_raw_image_body_answers_like_multipart(server, gallery_dir):
    url, _ = server
    path = _queries(gallery_dir)[0]
    data = path.read_bytes()
    multi = httpx.post(f"{url}/search", files={"image": ("q.png", data, "image/png")}, data={"k": "5"},
                       timeout=30).json()
    raw = httpx.post(f"{url}/search?k=5", content=data, headers={"Content-Type": "image/png"}, timeout=30)
    assert raw.status_code == 200, raw.text
    assert raw.json() == multi and raw.json()["results"][0]["path"] == str(path)
    default_k = httpx.post(f"{url}/search", content=data, headers={"Content-Type": "image/png"}, timeout=30).json()
    assert default_k["k"] == 10 and len(default_k["results"]) == 10
    emb_multi = httpx.post(f"{url}/embed", files={"image": ("q.png", data, "image/png")}, timeout=30).json()
    emb_raw = httpx.post(f"{url}/embed", content=data, headers={"Content-Type": "image/jpeg"}, timeout=30).json()
    assert emb_raw == emb_multi  # the format is read from the bytes, not from the header


def test_raw_image_body_errors(server):
    url, _ = server
    cases = {"not an image": (b"hello", "image/png", 415), "empty": (b"", "image/png", 400),
             "over the upload limit": (b"\x89PNG" + b"\0" * MAX_UPLOAD, "image/png", 413),
             "aspect ratio": (png(3000, 2), "image/png", 422)}
    for name, (body, ctype, status) in cases.items():
        r = httpx.post(f"{url}/search", content=body, headers={"Content-Type": ctype}, timeout=30)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json" and r.json()["error"], name
    r = httpx.post(f"{url}/search?k=0", content=png(20, 20), headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 422 and "k" in r.json()["error"]
    r = httpx.post(f"{url}/search", content=png(20, 20), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "image/" in r.json()["error"]


def test_openapi_documents_the_raw_body(server):
    url, _ = server
    schema = httpx.get(f"{url}/openapi.json", timeout=10).json()
    for path in ("/search", "/embed"):
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "image/*"}
        assert content["image/*"]["schema"] == {**content["image/*"]["schema"], "type": "string", "format": "binary"}
    assert schema["paths"]["/search"]["post"]["parameters"][0]["name"] == "k"


def test_a_lone_request_does_not_wait_for_a_batch(server, gallery_dir):
    """batch_wait_ms is 2 s here: a request with nothing else in flight goes at once all the same."""
    url, _ = server
    data = _queries(gallery_dir)[1].read_bytes()
    with httpx.Client(timeout=30) as c:
        c.post(f"{url}/embed", content=data, headers={"Content-Type": "image/png"})  # connection and model warm
        t0 = time.perf_counter()
        for _ in range(3):
            assert c.post(f"{url}/embed", content=data, headers={"Content-Type": "image/png"}).status_code == 200
        elapsed = time.perf_counter() - t0
    assert elapsed < 1.5, f"3 sequential requests took {elapsed:.2f} s: a lone request waited for a batch"


def test_concurrent_keep_alive_clients_share_batches(server, gallery_dir):
    url, app = server
    paths = _queries(gallery_dir, 8)
    before = app.state.batcher.stats()
    barrier = threading.Barrier(len(paths))
    status: list = []

    def client(p):
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            for _ in range(4):
                status.append(c.post(f"{url}/search?k=3", content=p.read_bytes(),
                                     headers={"Content-Type": "image/png"}).status_code)

    threads = [threading.Thread(target=client, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = app.state.batcher.stats()
    assert status == [200] * 32
    assert after["requests"] - before["requests"] == 32
    assert after["batches"] - before["batches"] < 32 and after["max_batch_seen"] > 1


def test_metrics_time_queue_waits_and_decodes(server, gallery_dir):
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = server

    def scrape() -> dict:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if not s.labels}

    before = scrape()
    data = _queries(gallery_dir)[2].read_bytes()
    for _ in range(2):
        assert httpx.post(f"{url}/embed", content=data, headers={"Content-Type": "image/png"},
                          timeout=30).status_code == 200
    after = scrape()
    assert after["ctxsim_queue_wait_seconds_count"] - before["ctxsim_queue_wait_seconds_count"] == 2
    assert after["ctxsim_decode_seconds_count"] - before["ctxsim_decode_seconds_count"] == 2
    assert after["ctxsim_decode_seconds_sum"] > before["ctxsim_decode_seconds_sum"]
    assert after["ctxsim_queue_depth"] == 0
    assert after["process_cpu_seconds_total"] >= before["process_cpu_seconds_total"] > 0


def test_a_failed_index_search_fails_only_the_searches_of_its_batch(flat_index, gallery_dir):
    """/embed requests batched with searches keep their answers when the index search fails."""
    import asyncio

    from ctxsim.deploy import load_index
    from ctxsim.deploy.batcher import DynamicBatcher
    from ctxsim.deploy.embedder import open_index_model

    index = load_index(flat_index)
    embedder = open_index_model(index.info, None)

    class BrokenSearch:  # the real index, whose search raises (a FAISS failure, a closed Milvus client)
        items, info = index.items, index.info

        def search(self, queries, k):
            raise RuntimeError("index search failed")

    data = sorted(gallery_dir.rglob("*.png"))[0].read_bytes()

    async def run():
        batcher = DynamicBatcher(embedder, BrokenSearch(), max_batch=8, wait_ms=200.0)
        await batcher.start()
        try:
            return await asyncio.gather(batcher.submit(data, None), batcher.submit(data, 3), batcher.submit(data, None),
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    embedded, searched, embedded_too = asyncio.run(run())
    assert isinstance(searched, RuntimeError) and "index search failed" in str(searched)
    for res in (embedded, embedded_too):
        emb, hits, fp = res
        assert hits is None and fp == embedder.fingerprint and emb.shape == (embedder.dim,)
