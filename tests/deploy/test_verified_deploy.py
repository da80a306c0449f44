"""Deploy trusts nothing it has not checked: damaged weights or a changed export artifact are refused when opened
(the server does not start with them, nor swaps them in), and a NaN/inf embedding is an error, never an empty
result: one line and exit 2 on the command line, a JSON 500 for that request alone in the server."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ctxsim.errors import ArtifactError, NonFiniteEmbedding

from export_helpers import perturb_onnx  # tests/export_helpers.py, beside tests/conftest.py


def flip_tensor_bytes(path: Path) -> None:
    """4 aligned bytes in the middle of a safetensors file's tensor data set to 0xFF (a float32 NaN), header intact."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    at = start + (len(data) - start) // 8 * 4
    data[at:at + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))


def nan_onnx(src: Path, dst: Path) -> Path:
    """A copy of a ctxsim ONNX file whose first convolution weights are NaN (contract metadata kept)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    init = next(i for i in proto.graph.initializer if numpy_helper.to_array(i).ndim == 4)
    init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.nan), init.name))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dst))
    return dst


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxsim.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _query(gallery_dir) -> Path:
    return sorted(sorted(gallery_dir.iterdir())[0].iterdir())[0]


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory, run_dir) -> Path:
    """A copy of the index's run folder with bytes of its tensor data flipped (header intact)."""
    run = shutil.copytree(run_dir, tmp_path_factory.mktemp("damaged") / "run")
    flip_tensor_bytes(run / "model.safetensors")
    return run


def test_damaged_weights_are_refused_by_embedder_and_server(damaged_run, flat_index):
    from ctxsim.deploy import create_app
    from ctxsim.deploy.embedder import Embedder

    with pytest.raises(ArtifactError, match="does not match the sha256 recorded in model.json"):
        Embedder.from_artifact(damaged_run, device="cpu")
    with pytest.raises(ArtifactError, match="model.safetensors"):  # the server does not start with them
        create_app(flat_index, model=damaged_run, reload_every_s=0)


def test_search_cli_refuses_damaged_weights_with_one_line(damaged_run, flat_index, gallery_dir):
    p = _cli("search", flat_index, _query(gallery_dir), "--model", damaged_run, "--json")
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "model.safetensors" in p.stderr
    assert '"neighbors"' not in p.stdout


def test_nan_embeddings_are_an_error(tmp_path, run_dir, flat_index, gallery_dir):
    """An artifact of the index's model (same fingerprint in its contract) that embeds everything as NaN."""
    from ctxsim.deploy import Embedder, load_index
    from ctxsim.export import export_onnx

    bad = nan_onnx(export_onnx(run_dir, tmp_path / "exp").onnx_path, tmp_path / "nan" / "model.onnx")
    emb = Embedder.from_artifact(bad, device="cpu")
    with pytest.raises(NonFiniteEmbedding, match="NaN or infinite") as e:
        emb.embed([_query(gallery_dir)])
    assert e.value.rows == [0] and "\n" not in str(e.value)
    with pytest.raises(NonFiniteEmbedding):  # the index refuses NaN queries too, whoever embedded them
        load_index(flat_index).search(np.full((1, 64), np.nan, np.float32), 3)

    p = _cli("search", flat_index, _query(gallery_dir), "--model", bad, "--json")
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "NaN" in p.stderr


class _Poisoned:
    """A backend that embeds constant images (an all-black upload) as NaN, everything else as the real one."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def run(self, batch):
        out = np.array(self._real.run(batch), dtype=np.float32)
        x = np.asarray(batch, dtype=np.float32).reshape(len(out), -1)
        out[x.max(axis=1) == x.min(axis=1)] = np.nan
        return out


def test_server_answers_500_for_a_nan_embedding_alone(flat_index, run_dir, gallery_dir):
    import io

    from PIL import Image
    from prometheus_client.parser import text_string_to_metric_families

    from ctxsim.deploy import create_app
    from ctxsim.deploy.embedder import Embedder

    httpx = pytest.importorskip("httpx")
    from test_deploy_serve import running

    real = Embedder.from_artifact(run_dir, device="cpu")
    poisoned = Embedder(_Poisoned(real._b), real.kind, real.artifact)
    buf = io.BytesIO()
    Image.new("L", (105, 105), 0).save(buf, format="PNG")
    black = buf.getvalue()
    good = _query(gallery_dir)
    app = create_app(flat_index, model=poisoned, reload_every_s=0, batch_wait_ms=2000, max_batch=8)
    batcher = app.state.batcher

    def until(pred):
        deadline = time.time() + 30
        while not pred():
            assert time.time() < deadline, "timed out"
            time.sleep(0.005)

    with running(app) as url:
        replies: dict = {}

        def streamed():  # the black image's request is still arriving when the good one is queued
            yield (b'--bnd\r\nContent-Disposition: form-data; name="k"\r\n\r\n3\r\n--bnd\r\nContent-Disposition: '
                   b'form-data; name="image"; filename="q.png"\r\nContent-Type: image/png\r\n\r\n')
            until(lambda: batcher.queue_depth == 1)
            yield black + b"\r\n--bnd--\r\n"

        def client(name, **kw):
            with httpx.Client(timeout=60) as c:
                replies[name] = c.post(f"{url}/search", **kw)

        # a lone request goes at once; one queued while another is being received waits for it (batch_wait_ms at
        # most), so the pair is one batch
        threads = [threading.Thread(target=client, args=("black",), kwargs={
            "content": streamed(), "headers": {"Content-Type": "multipart/form-data; boundary=bnd"}})]
        threads[0].start()
        until(lambda: batcher.receiving == 1)
        threads.append(threading.Thread(target=client, args=("good",), kwargs={
            "files": {"image": ("q.png", good.read_bytes(), "image/png")}, "data": {"k": "3"}}))
        threads[1].start()
        for t in threads:
            t.join(timeout=120)
        assert replies["black"].status_code == 500, replies["black"].text
        assert replies["black"].headers["content-type"].startswith("application/json")
        assert "NaN or inf" in replies["black"].json()["error"]
        assert replies["good"].status_code == 200, replies["good"].text
        body = replies["good"].json()
        assert len(body["results"]) == 3 and body["results"][0]["path"] == str(good)

        r = httpx.post(f"{url}/embed", files={"image": ("q.png", black, "image/png")}, timeout=30)
        assert r.status_code == 500 and "error" in r.json()
        info = httpx.get(f"{url}/info", timeout=10).json()
        assert info["batching"]["nonfinite"] == 2 and info["batching"]["batches"] == 2  # the pair was one batch
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in
                   text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text) for s in fam.samples}
        assert samples[("ctxsim_nonfinite_embeddings_total", ())] == 2
        assert samples[("ctxsim_requests_total", (("path", "/search"), ("status", "500")))] == 1
        assert samples[("ctxsim_requests_total", (("path", "/search"), ("status", "200")))] == 1


def test_follow_model_refuses_an_artifact_changed_since_export(tmp_path, flat_index, other_run_dir, extra_dir):
    """A new generation built with another model's export, whose model.onnx then changed (a killed re-export, a
    damaged copy): the swap is refused although the parity.json beside it says "passed" for the exported bytes."""
    import json

    from ctxsim.deploy import build_index, create_app
    from ctxsim.deploy.embedder import Embedder
    from ctxsim.export import export_run
    from ctxsim.io import sha256_file

    export = export_run(other_run_dir, tmp_path / "export", fp16=False, parity=False).out_dir
    # a verdict recorded for the exported bytes (other_run_dir has no evaluation data to compute one here)
    (export / "parity.json").write_text(json.dumps({"model.onnx": {
        "passed": True, "failures": [], "sha256": sha256_file(export / "model.onnx")}}))
    folder = shutil.copytree(flat_index, tmp_path / "index")
    app = create_app(folder, reload_every_s=0, follow_model=True)
    watcher = app.state.watcher
    images = sorted(sorted(extra_dir.iterdir())[0].iterdir())[:2]
    build_index(images, Embedder.from_artifact(export / "model.onnx", device="cpu"), folder, "flat")
    perturb_onnx(export / "model.onnx", export / "model.onnx")  # same contract and fingerprint, other bytes
    assert not asyncio.run(watcher.check())
    assert "manifest.json" in watcher.last_error and watcher.failures == 1
    assert app.state.batcher.index.count == 240  # still the previous generation, with the previous model
