"""The HTTP server, for real: uvicorn on a free loopback port, spoken to with httpx."""
from __future__ import annotations

import io
import shutil
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from serve_helpers import running  # noqa: E402

TOKEN = "s3cret-token"
MAX_UPLOAD = 200_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server(flat_index):
    from ctxsim.deploy import create_app

    app = create_app(flat_index, token=TOKEN, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS,
                     max_batch=32, batch_wait_ms=5)
    with running(app) as url:
        yield url, app


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _png(path) -> bytes:
    return path.read_bytes()


def _one_image(gallery_dir):
    return sorted(sorted(gallery_dir.iterdir())[0].iterdir())[0]


def test_health_and_info(server):
    url, _ = server
    assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    r = httpx.get(f"{url}/info", headers=AUTH, timeout=10)
    assert r.status_code == 200
    info = r.json()
    assert info["dim"] == 64 and info["index"]["type"] == "flat" and info["index"]["count"] == 240
    assert info["backend"].startswith("torch") and info["fingerprint"] == info["index"]["fingerprint"]


def test_search_and_embed(server, gallery_dir, flat_index):
    from ctxsim.deploy import load_index

    url, _ = server
    img = _one_image(gallery_dir)
    r = httpx.post(f"{url}/search", headers=AUTH, files={"image": (img.name, _png(img), "image/png")},
                   data={"k": "7"}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 7 and len(body["results"]) == 7
    top = body["results"][0]
    assert top["rank"] == 1 and top["path"] == str(img) and top["score"] == pytest.approx(1.0, abs=1e-5)
    r = httpx.post(f"{url}/search?k=3", headers=AUTH, files={"file": (img.name, _png(img), "image/png")}, timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    r = httpx.post(f"{url}/embed", headers=AUTH, files={"image": (img.name, _png(img), "image/png")}, timeout=30)
    assert r.status_code == 200
    vec = np.asarray(r.json()["embedding"], np.float32)
    idx = load_index(flat_index)
    stored = idx.embeddings[[it.path for it in idx.items].index(str(img))]
    np.testing.assert_allclose(vec, stored, atol=1e-5)


def test_auth(server, gallery_dir):
    url, _ = server
    img = _one_image(gallery_dir)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.post(f"{url}/search", headers=headers, files={"image": (img.name, _png(img), "image/png")},
                       timeout=10)
        assert r.status_code == 401 and "error" in r.json()
    assert httpx.get(f"{url}/info", timeout=10).status_code == 401


def test_bad_inputs_get_json_4xx(server, gallery_dir):
    from PIL import Image

    url, _ = server
    cases = []
    cases.append(("text", {"image": ("notes.txt", b"hello, not an image", "text/plain")}, {}))
    cases.append(("no file", None, {"k": "3"}))
    cases.append(("bad k", {"image": ("a.png", _png(_one_image(gallery_dir)), "image/png")}, {"k": "0"}))
    cases.append(("k not int", {"image": ("a.png", _png(_one_image(gallery_dir)), "image/png")}, {"k": "many"}))
    cases.append(("truncated", {"image": ("a.png", _png(_one_image(gallery_dir))[:80], "image/png")}, {}))
    big_body = {"image": ("big.png", b"\x89PNG" + b"\0" * (MAX_UPLOAD + 100_000), "image/png")}
    buf = io.BytesIO()
    Image.new("L", (2000, 1000), 255).save(buf, format="PNG")  # 2 Mpx, a few kB: over max_pixels, under the size limit
    many_px = {"image": ("huge.png", buf.getvalue(), "image/png")}
    statuses = {}
    for name, files, data in cases + [("oversized", big_body, {}), ("pixels", many_px, {})]:
        r = httpx.post(f"{url}/search", headers=AUTH, files=files, data=data, timeout=30)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json") and r.json()["error"], name
        statuses[name] = r.status_code
    assert statuses["text"] == 415 and statuses["oversized"] == 413 and statuses["pixels"] == 413
    assert statuses["bad k"] == 422 and statuses["k not int"] == 422


def test_oversized_chunked_upload(server):
    url, _ = server

    def chunks():  # a well-formed multipart body of ~400 kB, streamed without a Content-Length header
        yield (b'--zzz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(40):
            yield b"x" * 10_000
        yield b"\r\n--zzz--\r\n"

    r = httpx.post(f"{url}/embed", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=zzz"},
                   content=chunks(), timeout=30)
    assert r.status_code == 413 and "error" in r.json()


def test_concurrent_clients_are_batched(server, gallery_dir):
    url, _app = server
    before = httpx.get(f"{url}/info", headers=AUTH, timeout=10).json()["batching"]
    paths = sorted(gallery_dir.rglob("*.png"))[::7][:32]
    barrier = threading.Barrier(len(paths))
    results: list = [None] * len(paths)

    def client(i):
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            r = c.post(f"{url}/search", headers=AUTH, files={"image": ("q.png", paths[i].read_bytes(), "image/png")},
                       data={"k": "5"})
            results[i] = (r.status_code, r.json())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None and r[0] == 200 for r in results), results
    for p, (_, body) in zip(paths, results):
        assert "error" not in body and len(body["results"]) == 5
        assert body["results"][0]["path"] == str(p)  # each client got its own answer back
    after = httpx.get(f"{url}/info", headers=AUTH, timeout=10).json()["batching"]
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == len(paths)
    print(f"batching: {requests} requests in {batches} batches, largest {after['max_batch_seen']}")
    assert batches < requests and after["max_batch_seen"] > 1


def _wait_for(url, pred, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = httpx.get(f"{url}/info", timeout=10).json()
        if pred(info):
            return info
        time.sleep(0.05)
    raise AssertionError(f"timed out; last /info: {info}")


def test_hot_reload_after_index_add_and_refusal_of_another_model(tmp_path, flat_index, extra_dir, other_run_dir):
    """`index add` while serving: the new images are found without a restart; an index rebuilt with another
    model is refused and the previous generation keeps serving."""
    from ctxsim.deploy import add_to_index, build_index, create_app

    folder = shutil.copytree(flat_index, tmp_path / "index")
    new_image = sorted(sorted(extra_dir.iterdir())[0].iterdir())[0]
    upload = {"image": (new_image.name, _png(new_image), "image/png")}
    with running(create_app(folder, reload_every_s=0.1)) as url:
        first = _wait_for(url, lambda i: True)
        assert first["reload"]["every_s"] == 0.1 and first["reload"]["reloads"] == 0
        before = httpx.post(f"{url}/search", files=upload, data={"k": "1"}, timeout=30).json()["results"][0]
        assert before["path"] != str(new_image)  # not in the index yet

        add_to_index(folder, [new_image])
        info = _wait_for(url, lambda i: i["index"]["count"] == 241)
        assert info["index"]["generation"] == first["index"]["generation"] + 1 and info["reload"]["reloads"] == 1
        after = httpx.post(f"{url}/search", files=upload, data={"k": "1"}, timeout=30).json()["results"][0]
        assert after["path"] == str(new_image) and after["id"] == 240
        assert after["score"] == pytest.approx(1.0, abs=1e-5)

        build_index([new_image], other_run_dir, folder, "flat")  # same folder, another model
        info = _wait_for(url, lambda i: i["reload"]["last_error"] is not None)
        assert "refused" in info["reload"]["last_error"] and "model" in info["reload"]["last_error"]
        assert info["index"]["count"] == 241 and info["reload"]["reloads"] == 1 and info["reload"]["failures"] == 1
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "ctxsim_index_reload_failures_total 1.0" in metrics and "ctxsim_index_items 241.0" in metrics
        still = httpx.post(f"{url}/search", files=upload, data={"k": "1"}, timeout=30).json()["results"][0]
        assert still["path"] == str(new_image) and still["id"] == 240


def test_follow_model_swaps_model_and_index_together(tmp_path, flat_index, extra_dir, other_run_dir):
    """With follow_model, a rebuild with a retrained model (here: another run) is served with that model; the
    responses name the model that embedded them."""
    from ctxsim.deploy import build_index, create_app
    from ctxsim.nets import load_run

    folder = shutil.copytree(flat_index, tmp_path / "index")
    new_image = sorted(sorted(extra_dir.iterdir())[0].iterdir())[0]
    upload = {"image": (new_image.name, _png(new_image), "image/png")}
    other_fp = load_run(other_run_dir)[1].fingerprint
    with running(create_app(folder, reload_every_s=0.1, follow_model=True)) as url:
        first = _wait_for(url, lambda i: True)
        assert first["fingerprint"] != other_fp
        build_index([new_image], other_run_dir, folder, "flat")
        info = _wait_for(url, lambda i: i["fingerprint"] == other_fp)
        assert info["index"]["fingerprint"] == other_fp and info["index"]["count"] == 1
        assert info["reload"] == {**info["reload"], "reloads": 1, "failures": 0, "last_error": None}
        body = httpx.post(f"{url}/search", files=upload, data={"k": "1"}, timeout=30).json()
        assert body["fingerprint"] == other_fp and body["results"][0]["path"] == str(new_image)
        assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_follow_model_refuses_a_model_that_failed_parity(tmp_path, flat_index, extra_dir, omniglot_dir):
    """An automatic model swap is conservative: a new model whose own parity check failed (parity.json beside it)
    is refused, and the served model and index stay."""
    from ctxsim.deploy import build_index, create_app
    from ctxsim.export import check_parity, export_onnx

    from export_helpers import make_run, perturb_onnx

    run = make_run(tmp_path / "run2", "convnet", omniglot_dir, seed=2)
    damaged = perturb_onnx(export_onnx(run, tmp_path / "exp").onnx_path, tmp_path / "damaged" / "model.onnx")
    assert not check_parity(run, damaged, limit=100).passed  # writes damaged/parity.json, as `ctxsim parity` does
    folder = shutil.copytree(flat_index, tmp_path / "index")
    with running(create_app(folder, reload_every_s=0.1, follow_model=True)) as url:
        first = _wait_for(url, lambda i: True)
        build_index(sorted(sorted(extra_dir.iterdir())[0].iterdir())[:2], damaged, folder, "flat")
        info = _wait_for(url, lambda i: i["reload"]["last_error"] is not None)
        assert "failed its parity check" in info["reload"]["last_error"]
        assert info["fingerprint"] == first["fingerprint"] and info["index"]["count"] == 240


def test_recorded_parity_verdict(tmp_path):
    """A verdict counts only for the exact bytes it was computed on (the sha256 its record names)."""
    import json

    from ctxsim.export.parity import recorded_verdict
    from ctxsim.io import sha256_file

    art = tmp_path / "model.onnx"
    assert recorded_verdict(art) == (None, [])  # nothing recorded
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        (tmp_path / name).write_bytes(name.encode())
    sha = {p.name: sha256_file(p) for p in tmp_path.iterdir()}
    (tmp_path / "parity.json").write_text(json.dumps({
        "model.onnx": {"passed": False, "failures": ["x"], "sha256": sha["model.onnx"]},
        "model.fp16.onnx": {"passed": True, "failures": [], "sha256": sha["model.fp16.onnx"]},
        "model.int8.onnx": {"passed": True, "failures": []}}))  # recorded before records named their bytes
    assert recorded_verdict(art) == (False, ["x"])
    assert recorded_verdict(tmp_path / "model.fp16.onnx") == (True, [])
    assert recorded_verdict(tmp_path / "model.int8.onnx") == (None, [])  # bound to no bytes: no verdict
    (tmp_path / "model.fp16.onnx").write_bytes(b"other bytes")
    assert recorded_verdict(tmp_path / "model.fp16.onnx") == (None, [])  # "passed" was for other bytes
    assert recorded_verdict(tmp_path) == (None, [])  # a folder (a run folder) has no verdict
    (tmp_path / "parity.json").write_text("{not json")
    assert recorded_verdict(art) == (None, [])


def test_a_loaded_index_is_not_watched(flat_index):
    from ctxsim.deploy import create_app, load_index
    from ctxsim.errors import ConfigError

    app = create_app(load_index(flat_index))
    assert app.state.watcher.every_s == 0.0
    assert create_app(flat_index, precision="bf16").state.batcher.embedder.backend == "torch:cpu:bf16"
    with pytest.raises(ConfigError, match="reload_every_s"):
        create_app(flat_index, reload_every_s=-1)


def test_prometheus_metrics(server, gallery_dir):
    """GET /metrics (token required, like every endpoint but /healthz) counts requests by path and status, the
    refused ones included, and reports batch sizes and the served index."""
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = server

    def scrape() -> dict:
        r = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(r.text) for s in fam.samples}

    before = scrape()
    img = _one_image(gallery_dir)
    for _ in range(3):
        assert httpx.post(f"{url}/search", headers=AUTH, files={"image": (img.name, _png(img), "image/png")},
                          timeout=30).status_code == 200
    assert httpx.post(f"{url}/search", files={"image": (img.name, _png(img), "image/png")},
                      timeout=30).status_code == 401
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
    after = scrape()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("ctxsim_requests_total", path="/search", status="200") == 3
    assert delta("ctxsim_requests_total", path="/search", status="401") == 1
    assert delta("ctxsim_requests_total", path="/metrics", status="401") == 1
    assert delta("ctxsim_request_seconds_count", path="/search") == 4
    assert delta("ctxsim_batch_size_count") == 3 and delta("ctxsim_batch_size_sum") == 3  # one image per batch
    assert after[("ctxsim_index_items", ())] == 240 and after[("ctxsim_index_generation", ())] >= 1
    assert after[("ctxsim_index_reload_failures_total", ())] == 0
