"""The dynamic batcher of ``ctxsim serve``: concurrent requests' uploads decoded, embedded and searched as one batch.

Each request hands its upload (encoded bytes, or a decoded image) to :meth:`DynamicBatcher.submit`. One batcher
task on the event loop forms batches; one worker thread runs each batch: decode every upload (in the worker, or
in the decode pool when the batch carries large uploads), embed the decoded images in one call, search the index
with the batch, and hand every request its own result (or its own error) in one hand-off back to the event loop.

When the worker is free and requests are waiting, the batch goes at once, unless it is less than half full
(``max_batch`` / 2) and more requests are known to be coming: requests whose bodies are still being received
(:meth:`DynamicBatcher.arriving`), or keep-alive clients (a connection's second request or later) that the last
batch answered and that have not sent their next request yet. Then the batcher waits for them, woken by each
arrival (no polling), at most ``wait_ms`` (from when the batch could have gone, or from the last answer). So a lone
request never waits (nor does a client that opens a connection per request); under load, requests that arrive
while a batch runs form the next batch, and the clients just answered are given ``wait_ms`` to fill it.

One bad image fails only its own request: each upload is decoded and checked on its own, and when the batch's one
embedding call fails, each image is embedded alone.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from ctxsim.errors import ConfigError, ImageRefused, NonFiniteEmbedding

__all__ = ["DECODE_PARALLEL_BYTES", "DEFAULT_MAX_PIXELS", "DynamicBatcher", "HTTPError", "cancel_task", "decode_upload",
           "refused"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # the server's default pixel limit for uploads (`ctxsim serve --max-pixels`)
#: a batch whose uploads add up to more than this is decoded in the decode pool (in parallel); smaller ones in
#: the worker itself, where a thread hand-off would cost more than the decoding
DECODE_PARALLEL_BYTES = 256 * 1024


async def cancel_task(task: asyncio.Task | None) -> None:
    """Cancel a background task of the server (the batcher, the index watcher) and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class HTTPError(Exception):
    """An error answered as ``{"error": message, **extra}`` with ``status``."""

    def __init__(self, status: int, message: str, extra: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra or {}


def refused(e: Any) -> HTTPError:
    """An ImageRefused as the JSON error that names the limit: 413 (pixels) or 422 (aspect ratio, empty image)."""
    return HTTPError(e.status, str(e), {"limit": e.limit, "maximum": e.maximum, "value": e.value})


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Uploaded bytes -> an "L" or "RGB" image; HTTPError 400 (empty, corrupt), 413 (pixels), 415 (not an image),
    422 (aspect ratio, no pixels). The size is checked from the header, before a pixel is decoded."""
    from ctxsim.data.limits import check_image_size
    from ctxsim.deploy.gallery import load_image

    if not data:
        raise HTTPError(400, "empty upload; send an image file")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise HTTPError(413, f"image too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL.UnidentifiedImageError and friends
        raise HTTPError(415, f"not a readable image ({type(e).__name__}); send a JPEG, PNG, WebP, BMP, ...") from None
    with im:
        try:  # from the header, before a pixel is decoded (ctxsim.data.limits: pixels 413, aspect ratio 422)
            check_image_size(*im.size, max_pixels=max_pixels)
        except ImageRefused as e:
            raise refused(e) from None
        try:
            im.load()
            return load_image(im)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data
            raise HTTPError(400, f"corrupt image data ({type(e).__name__}: {e})") from None


class _Request:
    __slots__ = ("client", "future", "k", "queued", "upload")

    def __init__(self, upload: Any, k: int | None, future: asyncio.Future, queued: float, client: Any = None) -> None:
        self.upload, self.k, self.future, self.queued, self.client = upload, k, future, queued, client


class DynamicBatcher:
    """Collects concurrent embed/search requests into batches run by one worker thread (see the module docstring).

    ``decode(bytes) -> image`` decodes an upload (default :func:`decode_upload` with ``max_pixels``);
    ``decode_threads`` > 1 decodes batches of large uploads in parallel. Hooks, each optional: ``on_batch(size,
    seconds)`` after each batch, ``on_nonfinite(count)``, ``on_queue_wait(seconds)`` per request (from submit to its
    batch starting), ``on_decode(seconds)`` per decoded upload.
    """

    def __init__(self, embedder: Any, index: Any, max_batch: int = 32, wait_ms: float = 5.0,
                 on_batch: Any = None, decode_threads: int = 1, max_pixels: int | None = None,
                 decode: Callable[[bytes], Image.Image] | None = None, follow_clients: bool = True) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if decode_threads < 1:
            raise ConfigError(f"decode_threads must be >= 1, got {decode_threads}")
        self.served = (embedder, index)  # swapped as one: a batch never mixes one model with another's index
        self.on_batch = on_batch
        self.on_nonfinite: Any = None
        self.on_queue_wait: Any = None
        self.on_decode: Any = None
        if decode is None:
            pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
            decode = lambda data: decode_upload(data, pixels)  # noqa: E731
        self.decode = decode
        self.max_batch, self.wait_s = int(max_batch), max(0.0, float(wait_ms)) / 1000.0
        self.decode_threads = int(decode_threads)
        self.requests = 0
        self.batches = 0
        self.max_batch_seen = 0
        self.errors = 0
        self.nonfinite = 0
        self._pending: deque[_Request] = deque()
        self._arriving = 0
        self._returning: set = set()  # keep-alive clients answered by the last batch, not back yet
        self._answered_at = 0.0
        self._requests_of: dict = {}  # client -> requests seen on its connection (the most recent clients)
        self._follow = bool(follow_clients)
        self._half = max(1, (self.max_batch + 1) // 2)
        self._wake: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctxsim-batch")
        self._decode_pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ state
    @property
    def embedder(self) -> Any:
        return self.served[0]

    @property
    def index(self) -> Any:
        return self.served[1]

    def swap(self, embedder: Any, index: Any) -> None:
        """Serve ``index`` with ``embedder`` from the next batch on (a batch in flight keeps the old pair)."""
        self.served = (embedder, index)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._pending)

    @property
    def receiving(self) -> int:
        """Requests whose bodies are being received (inside :meth:`arriving`)."""
        return self._arriving

    def stats(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "batches": self.batches, "max_batch_seen": self.max_batch_seen,
                    "max_batch": self.max_batch, "wait_ms": self.wait_s * 1000.0, "errors": self.errors,
                    "nonfinite": self.nonfinite}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ctxsim-batcher")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------------------------------ requests
    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around receiving a request's body: the batcher waits (at most ``wait_ms``) for requests still arriving."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if self._arriving == 0:
                self._wake_up()

    async def submit(self, upload: Any, k: int | None, client: Any = None) -> tuple[np.ndarray, list | None, str]:
        """Decode (bytes) and embed ``upload``, and search it when ``k`` is given, as part of the next batch; returns
        (embedding, hits or None, fingerprint of the model that embedded it)."""
        if self._task is None:
            raise RuntimeError("the batcher is not running (app lifespan not started)")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(upload, k, fut, time.perf_counter(), client))
        if client is not None and self._follow:
            self._returning.discard(client)
            self._requests_of[client] = self._requests_of.pop(client, 0) + 1  # most recent last
            if len(self._requests_of) > 4 * self.max_batch + 64:
                del self._requests_of[next(iter(self._requests_of))]
        self._wake_up()
        return await fut

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Request]:
        while not self._pending:
            self._wake = loop.create_future()
            await self._wake
        if self.wait_s > 0 and len(self._pending) < self._half:
            start = loop.time()
            while len(self._pending) < self._half:
                if self._arriving:  # bodies being received: wait for them, at most wait_ms
                    deadline = start + self.wait_s
                elif self._returning:  # keep-alive clients answered just now: expected back within wait_ms
                    deadline = min(start, self._answered_at) + self.wait_s
                else:
                    break
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wake = loop.create_future()
                timer = loop.call_later(left, self._wake_up)
                await self._wake
                timer.cancel()
        self._wake = None
        batch: list[_Request] = []
        while self._pending and len(batch) < self.max_batch:
            r = self._pending.popleft()
            if not r.future.done():  # its client went away
                batch.append(r)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._pool, self._work, batch)
            except Exception as e:  # noqa: BLE001 - handed to each waiting request
                with self._lock:
                    self.errors += 1
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            if self._follow:  # keep-alive clients (a connection's second request or later) are expected back
                self._returning = {r.client for r in batch if self._requests_of.get(r.client, 0) > 1}
                self._answered_at = loop.time()
            for r, res in zip(batch, results):
                if not r.future.done():
                    if isinstance(res, BaseException):  # this request alone failed (its image, or NaN/inf)
                        r.future.set_exception(res)
                    else:
                        r.future.set_result(res)

    # ------------------------------------------------------------------------------------------ the worker
    def _decode_one(self, upload: Any) -> Any:
        if not isinstance(upload, (bytes, bytearray, memoryview)):
            return upload  # decoded already (a PIL image): prepared with the rest below
        t0 = time.perf_counter()
        try:
            return self.decode(bytes(upload))
        finally:
            if self.on_decode is not None:
                self.on_decode(time.perf_counter() - t0)

    def _decode_all(self, batch: list[_Request]) -> list[Any]:
        """Each upload decoded, or the exception that request gets."""
        def one(r: _Request) -> Any:
            try:
                return self._decode_one(r.upload)
            except Exception as e:  # noqa: BLE001 - that request's own error
                return e

        big = sum(len(r.upload) for r in batch if isinstance(r.upload, (bytes, bytearray, memoryview)))
        if self.decode_threads > 1 and len(batch) > 1 and big > DECODE_PARALLEL_BYTES:
            if self._decode_pool is None:
                self._decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="ctxsim-decode")
            return list(self._decode_pool.map(one, batch))
        return [one(r) for r in batch]

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
    def _embed_each(cls, embedder: Any, decoded: list) -> tuple[np.ndarray, dict[int, BaseException]]:
        """Embed a batch so that one bad image fails only its own request: (float32 [N, D], {position: the
        exception that request gets}; failed rows are zeros). Each image is prepared (checked against the decoding
        limits, converted) on its own, the prepared ones are embedded in one call, and when that call fails, each
        image is embedded alone to find the culprit(s)."""
        from ctxsim.deploy.gallery import load_image

        failed: dict[int, BaseException] = {}
        ready: list[int] = []
        images: list = []
        for i, im in enumerate(decoded):
            if isinstance(im, BaseException):
                failed[i] = im
                continue
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
        emb = np.zeros((len(decoded), next((len(v) for v in rows.values()), 1)), np.float32)
        for i, v in rows.items():
            emb[i] = v
        return emb, failed

    def _work(self, batch: list) -> list[Any]:
        """(embedding, hits or None, fingerprint) per request, or the exception that request alone gets. ``batch``:
        queued requests, or (upload, k) pairs."""
        embedder, index = self.served  # one pair for the whole batch, even if a reload swaps it meanwhile
        t0 = time.perf_counter()
        batch = [r if isinstance(r, _Request) else _Request(r[0], r[1], None, t0)  # type: ignore[arg-type]
                 for r in batch]
        if self.on_queue_wait is not None:
            for r in batch:
                self.on_queue_wait(t0 - r.queued)
        emb, failed = self._embed_each(embedder, self._decode_all(batch))
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
            for row in np.flatnonzero(bad):
                out[int(row)] = HTTPError(500, f"the model ({fp}) embedded this image as NaN or inf: nothing to search "
                                        "with; the served model may be damaged (check it with `ctxsim verify`)")
        ks = {i: r.k for i, r in enumerate(batch) if r.k is not None and not bad[i] and i not in failed}
        rows = list(ks)
        if rows and index is not None:
            try:
                scores, ids = index.search(emb[rows], max(ks.values()))
            except Exception as e:  # fails the searches only: /embed requests and refusals keep theirs
                logger.exception("index search failed for a batch of %d", len(rows))
                with self._lock:
                    self.errors += len(rows)
                for i in rows:
                    out[i] = e
                rows = []
            items = index.items
            for n, i in enumerate(rows):
                k = ks[i]
                hits = [{"rank": j + 1, "score": float(s), "id": int(t), "path": items[t].path,
                         "label": items[t].label}
                        for j, (s, t) in enumerate(zip(scores[n][:k], ids[n][:k])) if t >= 0]
                out[i] = (emb[i], hits, fp)
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - t0)
        return out
