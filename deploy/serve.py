"""HTTP serving for one box: a FastAPI app with search, embed, health and info endpoints and dynamic batching.

Endpoints (``create_app``):

- ``POST /search``: multipart upload (field ``image``; ``file`` is a legacy alias, not both), ``k`` as a form field
  or query parameter;
  returns ``{"k", "results": [{"rank", "score", "id", "path", "label"}], "fingerprint", "index_type"}``.
- ``POST /embed``: multipart upload; returns ``{"embedding": [...], "dim", "fingerprint"}``.
- ``GET /healthz``: ``{"status": "ok"}`` (never needs the token, for load balancers).
- ``GET /metrics``: Prometheus text format (``ctxsim.deploy.metrics``): requests, latency, batch sizes, index.
- ``GET /info``: model fingerprint, backend, index type/count/dim/params/generation, batching counters
  (``batching.requests``, ``batching.batches``, ``batching.max_batch_seen``) and reload state (``reload``).

Protection: with ``token`` every endpoint but ``/healthz`` needs ``Authorization: Bearer <token>`` (401 otherwise,
checked before the body is read). Request bodies over ``max_upload_bytes`` (plus a little multipart overhead) get
413 from the Content-Length header or while streaming. The decoding limits of ``ctxsim.data.limits`` are checked
from the image header, before a pixel is decoded: over ``max_pixels`` is 413, an aspect ratio over
``max_aspect_ratio`` (``CTXSIM_MAX_ASPECT_RATIO``) or an empty image 422, each body naming the limit
(``{"error", "limit", "maximum", "value"}``); non-images get 415, corrupt images 400. Every error body is JSON
``{"error": "..."}``; 405 carries ``Allow``. ``/openapi.json`` documents all of it (checked by Schemathesis in
tests/deploy/test_serve_schema.py). An image the model embeds
as NaN or inf gets 500 for that request alone (the rest of its batch is answered), counted in ``/metrics``
(``ctxsim_nonfinite_embeddings_total``) and ``/info`` (``batching.nonfinite``).

Verified artifacts: the model is opened through ``Embedder.from_artifact``, which refuses weights or an export
artifact whose bytes differ from what model.json / manifest.json record: the server does not start with it, and a
followed model (``follow_model``) is not swapped in. Its parity verdict counts only when recorded for its exact
bytes (``ctxsim.export.parity.recorded_verdict``).

Dynamic batching: each request puts its decoded image on an asyncio queue; one batcher task takes the first
waiting request, collects more for up to ``batch_wait_ms`` (at most ``max_batch``), and hands the whole batch to a
single worker thread that embeds it in one call (and searches the index with the batch). Requests that arrive
while a batch is being embedded form the next batch. One bad image fails only its own request: each request's image
is prepared (checked, converted) on its own, and when the batch's one call fails, each image is embedded alone.

Hot reload: when the app serves an index *folder*, :class:`IndexWatcher` reads its ``index.json`` every
``reload_every_s`` seconds; when the generation changed (``ctxsim index add``, or a rebuild), it loads the new
generation in a thread (sha256-verified), checks that its fingerprint is still the served model's, and swaps it
in. With ``follow_model`` a generation built with another model (a retrained model's rebuilt index) brings that
model along: it is opened from the path index.json records (refused when ``parity.json`` beside it says its
parity check failed; at start-up such a model is served with a warning) and the pair is swapped at once. A
batch in flight finishes on the model and index it started with; a generation that fails to load, or belongs to
another model without ``follow_model``, is refused once (logged, and shown in ``/info``) and the previous one
keeps serving.
"""
# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at runtime, and the
# endpoint types (UploadFile, ...) are imported inside create_app so that importing ctxsim.deploy stays light.
import asyncio
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ctxsim.errors import ConfigError, DataError, ImageRefused, MissingDependency, NonFiniteEmbedding

__all__ = ["create_app", "serve", "Batcher", "IndexWatcher", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_MAX_PIXELS"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
MULTIPART_SLACK = 64 * 1024   # form fields and multipart boundaries on top of the image bytes
OPEN_PATHS = ("/healthz",)


def _fastapi():
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart, for uploads)
    except ImportError:
        raise MissingDependency("serving needs FastAPI: pip install 'ctxsim[serve]'") from None


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, extra: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra or {}


def _refused(e: Any) -> _HTTPError:
    """An ImageRefused as the JSON error that names the limit: 413 (pixels) or 422 (aspect ratio, empty image)."""
    return _HTTPError(e.status, str(e), {"limit": e.limit, "maximum": e.maximum, "value": e.value})


# ---------------------------------------------------------------------------------------------- batching
class Batcher:
    """Collects concurrent embed/search requests into batches embedded by one worker thread."""

    def __init__(self, embedder: Any, index: Any, max_batch: int = 32, wait_ms: float = 5.0,
                 on_batch: Any = None) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.served = (embedder, index)  # swapped as one: a batch never mixes one model with another's index
        self.on_batch = on_batch  # (batch size, seconds) after each batch, e.g. ServeMetrics.observe_batch
        self.on_nonfinite: Any = None  # (count) of images embedded as NaN/inf, e.g. ServeMetrics.observe_nonfinite
        self.nonfinite = 0
        self.max_batch, self.wait_s = int(max_batch), max(0.0, float(wait_ms)) / 1000.0
        self.requests = 0
        self.batches = 0
        self.max_batch_seen = 0
        self.errors = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctxsim-embed")
        self._lock = threading.Lock()

    @property
    def embedder(self) -> Any:
        return self.served[0]

    @property
    def index(self) -> Any:
        return self.served[1]

    def swap(self, embedder: Any, index: Any) -> None:
        """Serve ``index`` with ``embedder`` from the next batch on (a batch in flight keeps the old pair)."""
        self.served = (embedder, index)

    def stats(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "batches": self.batches, "max_batch_seen": self.max_batch_seen,
                    "max_batch": self.max_batch, "wait_ms": self.wait_s * 1000.0, "errors": self.errors,
                    "nonfinite": self.nonfinite}

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="ctxsim-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def submit(self, image: Image.Image, k: int | None) -> tuple[np.ndarray, list | None, str]:
        """Embed one image (and search it when ``k`` is given) as part of the next batch; returns (embedding,
        hits or None, fingerprint of the model that embedded it)."""
        if self._queue is None:
            raise RuntimeError("the batcher is not running (app lifespan not started)")
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((image, k, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        q = self._queue
        assert q is not None
        while True:
            batch = [await q.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(q.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                await asyncio.sleep(min(left, 0.001))
            batch = [b for b in batch if not b[2].done()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._pool, self._work, [(b[0], b[1]) for b in batch])
            except Exception as e:  # noqa: BLE001 - handed to each waiting request
                with self._lock:
                    self.errors += 1
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, _, fut), res in zip(batch, results):
                if not fut.done():
                    if isinstance(res, BaseException):  # this request alone failed (its image, or NaN/inf)
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)

    @staticmethod
    def _embed_rows(embedder: Any, images: list) -> np.ndarray:
        """``embedder.embed(images)`` (one call); a NonFiniteEmbedding carrying all rows gives them back (the caller
        answers the NaN/inf ones 500)."""
        try:
            emb = embedder.embed(images)
        except NonFiniteEmbedding as e:  # fail only the requests whose rows are NaN/inf
            if e.embeddings is None or len(e.embeddings) != len(images):
                raise
            emb = e.embeddings
        return np.asarray(emb, dtype=np.float32)

    @classmethod
    def _embed_each(cls, embedder: Any, batch: list) -> tuple[np.ndarray, dict[int, BaseException]]:
        """Embed a batch so that one bad image fails only its own request: (float32 [N, D], {position: the
        exception that request gets}; failed rows are zeros). Each request's image is prepared (checked against the
        decoding limits, converted) on its own, the prepared ones are embedded in one call, and when that call
        fails, each image is embedded alone to find the culprit(s)."""
        from ctxsim.deploy.gallery import load_image

        failed: dict[int, BaseException] = {}
        ready: list[int] = []
        images: list = []
        for i, (im, _) in enumerate(batch):
            try:
                images.append(load_image(im))
                ready.append(i)
            except Exception as e:  # noqa: BLE001 - that request's own error
                failed[i] = e
        rows: dict[int, np.ndarray] = {}
        if ready:
            try:
                rows = dict(zip(ready, cls._embed_rows(embedder, images)))  # one call for the whole batch
            except Exception as e:  # noqa: BLE001 - find the culprit(s): each image alone
                if len(ready) == 1:
                    failed[ready[0]] = e
                else:
                    for i, im in zip(ready, images):
                        try:
                            rows[i] = cls._embed_rows(embedder, [im])[0]
                        except Exception as e1:  # noqa: BLE001
                            failed[i] = e1
        emb = np.zeros((len(batch), next((len(v) for v in rows.values()), 1)), np.float32)
        for i, v in rows.items():
            emb[i] = v
        return emb, failed

    def _work(self, batch: list[tuple[Image.Image, int | None]]) -> list[Any]:
        """(embedding, hits or None, fingerprint) per request, or the exception that request alone gets."""
        embedder, index = self.served  # one pair for the whole batch, even if a reload swaps it meanwhile
        t0 = time.perf_counter()
        emb, failed = self._embed_each(embedder, batch)
        bad = ~np.isfinite(emb).all(axis=1)  # also for an embedder object that does not check itself
        with self._lock:
            self.batches += 1
            self.requests += len(batch)
            self.max_batch_seen = max(self.max_batch_seen, len(batch))
            self.nonfinite += int(bad.sum())
            self.errors += len(failed)
        fp = embedder.fingerprint
        out: list[Any] = [failed.get(i, (emb[i], None, fp)) for i in range(len(batch))]
        if bad.any():
            logger.error("model %s embedded %d of %d image(s) as NaN or inf; those requests get 500", fp,
                         int(bad.sum()), len(batch))
            if self.on_nonfinite is not None:
                self.on_nonfinite(int(bad.sum()))
            for i in np.flatnonzero(bad):
                out[i] = _HTTPError(500, f"the model ({fp}) embedded this image as NaN or inf: nothing to search "
                                         "with; the served model may be damaged (check it with `ctxsim verify`)")
        rows = [i for i, (_, k) in enumerate(batch) if k is not None and not bad[i] and i not in failed]
        if rows and index is not None:
            kmax = max(batch[i][1] for i in rows)
            scores, ids = index.search(emb[rows], kmax)
            items = index.items
            for r, i in enumerate(rows):
                k = batch[i][1]
                hits = [{"rank": j + 1, "score": float(s), "id": int(t), "path": items[t].path,
                         "label": items[t].label}
                        for j, (s, t) in enumerate(zip(scores[r][:k], ids[r][:k])) if t >= 0]
                out[i] = (emb[i], hits, fp)
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - t0)
        return out


# ---------------------------------------------------------------------------------------------- hot reload
class IndexWatcher:
    """Swaps the batcher's (model, index) pair for the folder's newest generation (see the module docstring)."""

    def __init__(self, folder: Any, batcher: Batcher, every_s: float, open_model: Any = None) -> None:
        self.folder, self.batcher = folder, batcher
        self.every_s = float(every_s)
        self.open_model = open_model  # path -> Embedder: follow a generation built with another model
        self.generation = batcher.index.info.generation
        self.reloads = 0
        self.failures = 0
        self.refused: int | None = None  # a generation that failed: not retried until another one appears
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None

    def stats(self) -> dict:
        return {"every_s": self.every_s, "generation": self.generation, "reloads": self.reloads,
                "failures": self.failures, "last_error": self.last_error}

    async def start(self) -> None:
        if self.every_s > 0:
            self._task = asyncio.create_task(self._loop(), name="ctxsim-index-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self.check()

    async def check(self) -> bool:
        """Reload if ``index.json`` names another generation; True when the served index changed."""
        from ctxsim.deploy.index import load_index, read_index_info

        try:
            generation = read_index_info(self.folder).generation
        except Exception as e:  # noqa: BLE001 - mid-replacement or removed: keep serving what we have
            self.last_error = f"cannot read {self.folder}: {e}"
            return False
        if generation in (self.generation, self.refused):
            return False
        loop = asyncio.get_running_loop()
        embedder = self.batcher.embedder
        try:
            new = await loop.run_in_executor(None, load_index, self.folder)
            if new.fingerprint != embedder.fingerprint and self.open_model is not None:
                embedder = await loop.run_in_executor(None, self._open_model_of, new)
            new.check_model(embedder.fingerprint)
        except Exception as e:  # noqa: BLE001 - a bad generation must not take the server down
            self.refused, self.last_error = generation, f"generation {generation} refused: {e}"
            self.failures += 1
            logger.error("%s: %s; still serving generation %d", self.folder, self.last_error, self.generation)
            return False
        self.batcher.swap(embedder, new)
        self.generation, self.refused, self.last_error = new.info.generation, None, None
        self.reloads += 1
        logger.info("%s: now serving generation %d (%d items, model %s)", self.folder, new.info.generation,
                    new.info.count, embedder.fingerprint)
        return True

    def _open_model_of(self, index: Any) -> Any:
        from ctxsim.deploy.embedder import open_index_model

        return open_index_model(index.info, opener=self._open_passed)

    def _open_passed(self, model: Any) -> Any:
        from ctxsim.export.parity import recorded_verdict

        passed, failures = recorded_verdict(model)
        if passed is False:  # an automatic swap must not bring in an artifact its own parity check failed
            raise ConfigError(f"{Path(model).name} failed its parity check ({'; '.join(failures[:2])})")
        return self.open_model(model)


# ---------------------------------------------------------------------------------------------- guard
class _Guard:
    """Pure ASGI middleware: bearer token and request-size limits, enforced before the body is parsed."""

    def __init__(self, app: Any, token: str | None, max_body: int) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    @staticmethod
    async def _reply(send: Any, status: int, message: str, headers: list | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.token is not None and scope.get("path") not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                await self._reply(send, 401, "missing or wrong bearer token; send 'Authorization: Bearer <token>'",
                                  [(b"www-authenticate", b"Bearer")])
                return
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                length = int(cl)
            except ValueError:
                await self._reply(send, 400, "bad Content-Length header")
                return
            if length > self.max_body:
                await self._reply(send, 413, f"request body of {length} bytes exceeds the limit of "
                                              f"{self.max_body} bytes")
                return
        from starlette.exceptions import HTTPException

        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:  # chunked upload without Content-Length
                    raise HTTPException(413, f"request body exceeds the limit of {self.max_body} bytes")
            return msg

        await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------------------------------------- decoding
def _decode(data: bytes, max_pixels: int) -> Image.Image:
    from ctxsim.data.limits import check_image_size
    from ctxsim.deploy.gallery import load_image

    if not data:
        raise _HTTPError(400, "empty upload; send an image file")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _HTTPError(413, f"image too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL.UnidentifiedImageError and friends
        raise _HTTPError(415, f"not a readable image ({type(e).__name__}); send a JPEG, PNG, WebP, BMP, ...") from None
    with im:
        try:  # from the header, before a pixel is decoded (ctxsim.data.limits: pixels 413, aspect ratio 422)
            check_image_size(*im.size, max_pixels=max_pixels)
        except ImageRefused as e:
            raise _refused(e) from None
        try:
            im.load()
            return load_image(im)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data
            raise _HTTPError(400, f"corrupt image data ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------- app
def _complete_openapi(schema: dict, secured: bool) -> dict:
    """What FastAPI's generated schema cannot say, added in place: the upload is required (field ``image``, a binary
    part); ``k`` is an integer when sent (optional, not nullable: ``null`` is no integer); with a token, the bearer
    scheme every operation but /healthz needs.

    The legacy field name ``file`` (an alias of ``image``; sending both is a 422) is named in each operation's
    description, not in the schema: a body schema offering either of two fields needs ``oneOf``/``anyOf`` over
    ``required``, which Schemathesis 4 (our conformance test) cannot fuzz for binary parts."""
    def not_null(s: dict) -> None:
        kept = [b for b in s.get("anyOf", ()) if b.get("type") != "null"]
        if len(kept) == 1:
            del s["anyOf"]
            s.update(kept[0])

    for path in ("/search", "/embed"):
        op = schema["paths"][path]["post"]
        op["description"] = ("Upload the image as the multipart field `image` (JPEG, PNG, WebP, BMP, GIF, TIFF, ...); "
                             "`file` is accepted as a legacy alias (send one of the two).")
        for param in op.get("parameters", ()):
            not_null(param["schema"])
        body = op["requestBody"]
        body["required"] = True
        ref = body["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
        form = schema["components"]["schemas"][ref]
        form["properties"].pop("file", None)
        form["properties"]["image"] = {"type": "string", "format": "binary", "description": "the image file"}
        form["required"] = ["image"]
        if "k" in form["properties"]:
            not_null(form["properties"]["k"])
    for item in schema["paths"].values():  # error bodies are JSON, also where the success is text (/metrics)
        for op in item.values():
            for code, resp in op.get("responses", {}).items():
                content = resp.get("content", {})
                if not code.startswith("2") and "text/plain" in content and "application/json" not in content:
                    content["application/json"] = content.pop("text/plain")
    if secured:
        schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        for path in OPEN_PATHS:
            for op in schema["paths"].get(path, {}).values():
                op["security"] = []
    return schema


def create_app(index_dir: Any, model: Any = None, token: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_batch: int = 32, batch_wait_ms: float = 5.0, max_k: int = 1000, default_k: int = 10,
               device: str = "auto", reload_every_s: float = 2.0, precision: str = "fp32",
               compile: bool = False, follow_model: bool = False) -> Any:
    """A FastAPI app serving ``index_dir`` (a folder or a loaded Index) with ``model`` (default: the index's).

    The model's fingerprint must match the index's (FingerprintMismatch otherwise). A folder is watched for new
    generations every ``reload_every_s`` seconds (0: never; ``follow_model``: a generation built with another model
    brings it along); a loaded Index is served as it is. ``precision`` and ``compile`` apply to a run folder served
    with PyTorch (see ``Embedder.from_artifact``).
    """
    _fastapi()
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from pydantic import BaseModel
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ctxsim import __version__
    from ctxsim.data.limits import image_limits
    from ctxsim.deploy.embedder import Embedder, open_index_model
    from ctxsim.deploy.index import Index, load_index
    from ctxsim.deploy.metrics import MetricsMiddleware, ServeMetrics

    if max_upload_bytes < 1 or max_pixels < 1:
        raise ConfigError("max_upload_bytes and max_pixels must be positive")
    image_limits()  # a malformed CTXSIM_MAX_* variable stops the server now, not each request
    if token is not None and not token:
        raise ConfigError("token must be a non-empty string (or None for no authentication)")
    if reload_every_s < 0:
        raise ConfigError(f"reload_every_s must be >= 0 (0: never reload), got {reload_every_s}")
    index = index_dir if isinstance(index_dir, Index) else load_index(index_dir)

    def open_model(path: Any) -> Any:  # at start-up, and in the watcher's thread for a followed model
        new = Embedder.from_artifact(path, device=device, batch_size=max(64, max_batch), precision=precision,
                                     compile=compile)
        if compile:  # build (and tune) the graphs now, not on the first requests
            logger.info("compiling %s for batches of 1 and %d (once; minutes with max-autotune on a GPU)",
                        path, new.batch_size)
            new.warm_up()
        return new

    embedder = open_index_model(index.info, model, opener=open_model)
    from ctxsim.export.parity import recorded_verdict

    passed, failures = recorded_verdict(getattr(embedder, "artifact", "") or "")
    if passed is False:  # served on purpose perhaps, but never silently
        logger.warning("%s failed its parity check (%s): it may not retrieve what the trained model retrieves",
                       getattr(embedder, "artifact", "the model"), "; ".join(failures[:2]))
    elif passed is None and getattr(embedder, "kind", "torch") != "torch":  # a run folder is the reference itself
        logger.warning("%s has no parity verdict for its bytes (none recorded, or one of other bytes); check it "
                       "with `ctxsim parity` or `ctxsim verify`", getattr(embedder, "artifact", "the model"))
    batcher = Batcher(embedder, index, max_batch=max_batch, wait_ms=batch_wait_ms)
    watcher = IndexWatcher(index_dir, batcher, 0.0 if isinstance(index_dir, Index) else reload_every_s,
                           open_model if follow_model else None)
    metrics = ServeMetrics(max_batch, lambda: batcher.index.info, watcher.stats)
    batcher.on_batch = metrics.observe_batch
    batcher.on_nonfinite = metrics.observe_nonfinite
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        await batcher.start()
        await watcher.start()
        try:
            yield
        finally:
            await watcher.stop()
            await batcher.stop()

    app = FastAPI(title="ctxsim", version=__version__, lifespan=lifespan)
    app.state.batcher, app.state.watcher = batcher, watcher
    app.state.metrics = metrics

    def error(status: int, message: str, extra: dict | None = None, headers: Any = None) -> JSONResponse:
        return JSONResponse({"error": message, **(extra or {})}, status_code=status, headers=headers)

    @app.exception_handler(_HTTPError)
    async def _own(_: Request, e: _HTTPError) -> JSONResponse:
        return error(e.status, e.message, e.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:  # keeps e.g. 405's Allow header
        return error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(DataError)
    async def _data(_: Request, e: DataError) -> JSONResponse:  # an image the batcher refused: its request alone
        if isinstance(e, ImageRefused):
            r = _refused(e)
            return error(r.status, r.message, r.extra)
        return error(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        logger.exception("request failed")
        return error(500, f"internal error ({type(e).__name__})")

    async def _image(image: UploadFile | None, file: UploadFile | None) -> Image.Image:
        up = image or file
        if up is None:
            raise _HTTPError(422, "no image uploaded; send multipart/form-data with an 'image' file field")
        if image is not None and file is not None:
            raise _HTTPError(422, "two images uploaded; send one, in the 'image' field (or 'file'), not both")
        data = await up.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise _HTTPError(413, f"upload exceeds the limit of {max_upload_bytes} bytes")
        return await run_in_threadpool(_decode, data, max_pixels)

    class ErrorBody(BaseModel):
        """Every error: a one-line message; an image refused by a decoding limit also names the limit."""

        error: str
        limit: str | None = None
        maximum: float | None = None
        value: float | None = None

    def documented(codes: dict | None = None) -> dict:  # {status: description} -> responses, bodies ErrorBody
        out = {c: {"model": ErrorBody, "description": d} for c, d in (codes or {}).items()}
        if token is not None:
            out[401] = {"model": ErrorBody, "description": "missing or wrong bearer token"}
        return out

    upload_errors = documented({
        400: "invalid multipart data, an empty upload or corrupt image data",
        413: f"a request body over {max_upload_bytes} bytes, or an image over max_pixels ({max_pixels}); "
             "the body names the limit",
        415: "not a readable image",
        422: "no image uploaded, a bad k, or an image refused by its shape (aspect ratio over max_aspect_ratio, "
             "or no pixels); the body names the limit",
        500: "internal error, or the model embedded the image as NaN or inf"})

    def openapi() -> dict:  # FastAPI's schema plus what its signature-derived schema cannot say
        if app.openapi_schema is None:
            _complete_openapi(FastAPI.openapi(app), token is not None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/info", responses=documented())
    async def info() -> dict:
        served, i = batcher.embedder, batcher.index.info
        return {"fingerprint": served.fingerprint, "backend": served.backend, "dim": i.dim,
                "index": {"type": i.index_type, "count": i.count, "dim": i.dim, "params": i.params,
                          "metric": i.metric, "fingerprint": i.fingerprint, "updated": i.updated,
                          "generation": i.generation},
                "batching": batcher.stats(), "reload": watcher.stats(), "limits": {"max_upload_bytes": max_upload_bytes,
                                                        "max_pixels": max_pixels, "max_k": max_k,
                                                        "max_aspect_ratio": image_limits()[1]},
                "ctxsim_version": __version__, "uptime_s": round(time.time() - started, 1)}

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        **documented(), 200: {"description": "Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics_ep() -> Any:
        body, content_type = metrics.render()
        return PlainTextResponse(content=body, media_type=content_type)

    @app.post("/search", responses=upload_errors)
    async def search_ep(image: UploadFile | None = File(None), file: UploadFile | None = File(None),
                        k_form: int | None = Form(None, alias="k", ge=1, le=max_k),
                        k_query: int | None = Query(None, alias="k", ge=1, le=max_k)) -> dict:
        k = k_form if k_form is not None else (k_query if k_query is not None else default_k)
        if not 1 <= k <= max_k:
            raise _HTTPError(422, f"k must be between 1 and {max_k}, got {k}")
        img = await _image(image, file)
        _, hits, fingerprint = await batcher.submit(img, k)
        return {"k": k, "results": hits, "fingerprint": fingerprint, "index_type": batcher.index.index_type}

    @app.post("/embed", responses=upload_errors)
    async def embed_ep(image: UploadFile | None = File(None), file: UploadFile | None = File(None)) -> dict:
        img = await _image(image, file)
        vec, _, fingerprint = await batcher.submit(img, None)
        return {"embedding": [float(x) for x in vec], "dim": int(vec.shape[0]), "fingerprint": fingerprint}

    app.add_middleware(_Guard, token=token, max_body=max_upload_bytes + MULTIPART_SLACK)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts what the guard refuses too
    return app


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path`` (first line, surrounding whitespace stripped): a secret kept out of the process
    list, where ``--token VALUE`` would show it. ConfigError (one line) when unreadable or empty."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the token file {path} ({type(e).__name__}); give a readable text file") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ConfigError(f"the token file {path} is empty; write the token on its first line")
    return token


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(index_dir: Any, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, model: Any = None,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
          max_batch: int = 32, batch_wait_ms: float = 5.0, device: str = "auto", log_level: str = "info",
          reload_every_s: float = 2.0, precision: str = "fp32", compile: bool = False,
          follow_model: bool = False) -> None:
    """Serve ``index_dir`` over HTTP with uvicorn (blocking). Loopback only unless ``host`` says otherwise."""
    _fastapi()
    try:
        import uvicorn
    except ImportError:
        raise MissingDependency("serving needs uvicorn: pip install 'ctxsim[serve]'") from None
    token = token if token is not None else (os.environ.get("CTXSIM_TOKEN") or None)
    if not _is_loopback(host) and token is None:
        logger.warning("serving on %s without a token: anyone who can reach this port can query the index; "
                       "pass --token (or set CTXSIM_TOKEN)", host)
    app = create_app(index_dir, model=model, token=token, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels,
                     max_batch=max_batch, batch_wait_ms=batch_wait_ms, device=device, reload_every_s=reload_every_s,
                     precision=precision, compile=compile, follow_model=follow_model)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
