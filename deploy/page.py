"""The search page of ``ctxsim serve`` and the item endpoints it uses (docs/SERVING.md).

- ``GET /`` and ``GET /static/page.{css,js}``: the page, package data in deploy/static/ (no build step, no CDN). It
  holds no data, so it is served without the token (:data:`PAGE_PATHS`, open in the server's guard); all it shows
  comes from the guarded API, with the bearer token the page asks for.
- ``GET /items/{id}``: an item of the served index (id, path, label, generation).
- ``GET /items/{id}/thumbnail``: the item's image, at most :data:`THUMBNAIL_PX` a side, by id only (never a
  client-supplied path); decoding bounded by ``ctxsim.data.limits``; an LRU keyed by (index, generation, id);
  a placeholder (header ``X-Ctxsim-Placeholder``) when the file has moved or cannot be read.
- ``GET /items/{id}/similar?k=``: "more like this": the top-k of the item's stored embedding (no upload, no
  re-embedding; an index without stored embeddings embeds the item's file instead).
- ``GET /model``: the served model: fingerprint, kind, backend, precision and the parity verdict recorded for its
  exact bytes.
"""
# No ``from __future__ import annotations``: FastAPI reads the endpoint annotations at runtime.
import hashlib
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["PAGE_PATHS", "THUMBNAIL_PX", "ThumbnailCache", "describe_model", "page_router", "render_thumbnail"]

#: The page and its assets: the only paths besides /healthz that need no token (they hold no data).
PAGE_PATHS = ("/", "/static/page.css", "/static/page.js")
THUMBNAIL_PX = 256
CACHE_BYTES = 16 * 1024 * 1024
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
           "/static/page.css": ("page.css", "text/css; charset=utf-8"),
           "/static/page.js": ("page.js", "text/javascript; charset=utf-8")}
# The page loads nothing from elsewhere (air-gapped boxes); thumbnails are blob: URLs (fetched with the token).
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                                            "script-src 'self'; connect-src 'self'; base-uri 'none'; "
                                            "form-action 'none'; frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


# ---------------------------------------------------------------------------------------------- thumbnails
class ThumbnailCache:
    """A thread-safe LRU of rendered thumbnails, bounded by total bytes."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.size = 0
        self.hits = self.misses = 0
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._d.get(key)
            if value is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Any, value: tuple[bytes, str]) -> None:
        n = len(value[0])
        if n > self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.size -= len(old[0])
            self._d[key] = value
            self.size += n
            while self.size > self.max_bytes:
                _, dropped = self._d.popitem(last=False)
                self.size -= len(dropped[0])

    def __len__(self) -> int:
        return len(self._d)


def render_thumbnail(path: str | os.PathLike, size: int = THUMBNAIL_PX) -> tuple[bytes, str]:
    """(encoded bytes, media type) of the image at ``path`` shrunk to at most ``size`` a side, as the model sees it
    ("L" or "RGB"): JPEG when the file is a JPEG, PNG otherwise. The size is checked from the header first
    (``ctxsim.data.limits``); raises whatever reading or decoding raises."""
    from ctxsim.data.images import open_image

    with Image.open(path) as probe:  # the header only: the format to answer in
        fmt = "JPEG" if probe.format == "JPEG" else "PNG"
    small = open_image(path, draft=size)  # size checked from the header, JPEG decoded at a reduced scale
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "JPEG":
        small.save(buf, "JPEG", quality=85)
    else:
        small.save(buf, "PNG", optimize=True)
    return buf.getvalue(), f"image/{fmt.lower()}"


def _placeholder(reason: str, size: int = THUMBNAIL_PX) -> bytes:
    """A grey square with a crossed frame and one word: the thumbnail of a file that moved or cannot be read."""
    from PIL import ImageDraw

    im = Image.new("L", (size, size), 225)
    d = ImageDraw.Draw(im)
    m = size // 6
    d.rectangle((m, m, size - m, size - m), outline=130, width=3)
    d.line((m, m, size - m, size - m), fill=170, width=2)
    d.line((m, size - m, size - m, m), fill=170, width=2)
    text = "file moved" if reason == "missing" else "unreadable"
    box = d.textbbox((0, 0), text)
    d.rectangle((0, size - m + 8, size, size), fill=225)
    d.text(((size - (box[2] - box[0])) // 2, size - m + 12), text, fill=60)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- model
def _precision(embedder: Any) -> str | None:
    contract = getattr(embedder, "contract", None) or {}
    if contract.get("precision"):  # an export artifact records it
        return str(contract["precision"])
    if getattr(embedder, "kind", None) == "torch":  # "torch:cuda:bf16:compiled"
        parts = str(getattr(embedder, "backend", "")).split(":")
        return next((p for p in parts if p in ("bf16", "fp16")), "fp32")
    return None


def describe_model(embedder: Any) -> dict:
    """What is served: fingerprint, kind, backend, artifact name, precision and the parity verdict recorded for the
    artifact's exact bytes (``ctxsim.export.parity.parity_record``): "passed", "failed", "none" (with why), or
    "reference" for a run folder at fp32, the PyTorch model parity is measured against. Hashes the artifact."""
    from ctxsim.export.parity import parity_record

    kind = getattr(embedder, "kind", None)
    artifact = getattr(embedder, "artifact", None)
    precision = _precision(embedder)
    parity: dict[str, Any] = {"verdict": "none", "failures": [], "detail": "", "precision": None}
    if kind == "torch":
        if precision == "fp32":
            parity.update(verdict="reference", detail="the PyTorch fp32 model parity checks compare against")
        else:
            parity["detail"] = f"PyTorch at {precision}: no parity check is recorded for it"
    elif artifact is not None:
        entry, why = parity_record(artifact)
        if entry is None:
            parity["detail"] = why
        else:
            parity.update(verdict="passed" if entry["passed"] else "failed",
                          failures=[str(f) for f in entry.get("failures", [])], precision=entry.get("precision"))
    else:
        parity["detail"] = "the served model names no artifact"
    return {"fingerprint": str(getattr(embedder, "fingerprint", "")), "kind": kind,
            "backend": str(getattr(embedder, "backend", "")),
            "artifact": Path(artifact).name if artifact is not None else None, "precision": precision,
            "parity": parity}


# ---------------------------------------------------------------------------------------------- the router
def _static(name: str) -> bytes:
    return (resources.files("ctxsim.deploy") / "static" / name).read_bytes()


def page_router(batcher: Any, responses: Callable[[dict | None], dict], max_k: int = 1000,
                default_k: int = 10) -> Any:
    """The page and item endpoints as a FastAPI router. ``batcher.served`` is the served (embedder, index) pair,
    read once per request (a hot reload swaps it); ``batcher.submit(image, k)`` embeds and searches an image (only
    for an index that keeps no embeddings). ``responses({status: description})`` documents error statuses as the
    app's other operations do (its error body; 401 when a token is required)."""
    from fastapi import APIRouter, HTTPException, Query, Request
    from fastapi import Path as PathParam
    from fastapi.responses import Response
    from pydantic import BaseModel
    from starlette.concurrency import run_in_threadpool

    from ctxsim.errors import ArtifactError

    router = APIRouter()
    assets = {path: (_static(name), media) for path, (name, media) in _STATIC.items()}
    cache = ThumbnailCache()
    placeholders = {reason: _placeholder(reason) for reason in ("missing", "unreadable")}
    models: dict[int, tuple[Any, dict]] = {}  # id(embedder) -> (embedder, description): hashed once per model

    def page_asset(path: str) -> Callable:
        body, media = assets[path]

        async def asset() -> Response:
            return Response(body, media_type=media, headers=_PAGE_HEADERS)
        return asset

    for path in PAGE_PATHS:
        router.add_api_route(path, page_asset(path), methods=["GET"], include_in_schema=False)

    class ItemBody(BaseModel):
        """One item of the served index's item table."""

        id: int
        path: str
        label: str | None = None
        generation: int

    class Hit(BaseModel):
        rank: int
        score: float
        id: int
        path: str
        label: str | None = None

    class SimilarBody(BaseModel):
        """The top-k of an item's stored embedding: the body of ``POST /search``, plus the query item."""

        k: int
        results: list[Hit]
        fingerprint: str
        index_type: str
        generation: int
        query: ItemBody

    class ParityBody(BaseModel):
        verdict: str
        failures: list[str]
        detail: str
        precision: str | None = None

    class ModelBody(BaseModel):
        """The served model and the parity verdict recorded for its exact bytes."""

        fingerprint: str
        kind: str | None = None
        backend: str
        artifact: str | None = None
        precision: str | None = None
        parity: ParityBody

    def item_id_param() -> Any:
        return PathParam(..., description="the item's id (its row in the served index)")

    unknown = {404: "no item with this id in the served index"}

    def lookup(index: Any, item_id: int) -> Any:
        items = index.items
        if not 0 <= item_id < len(items):
            raise HTTPException(404, f"no item {item_id} in the served index (generation {index.info.generation} "
                                     f"holds ids 0 to {len(items) - 1})")
        return items[item_id]

    def item_body(index: Any, it: Any) -> dict:
        return {"id": int(it.id), "path": it.path, "label": it.label, "generation": index.info.generation}

    @router.get("/items/{item_id}", response_model=ItemBody, responses=responses({**unknown, 422: "not an integer id"}))
    async def item(item_id: int = item_id_param()) -> dict:
        """An item of the served index: its id, the path it was indexed from and its label."""
        index = batcher.served[1]
        return item_body(index, lookup(index, item_id))

    image_content = {"schema": {"type": "string", "format": "binary"}}

    @router.get("/items/{item_id}/thumbnail", response_class=Response, responses={
        200: {"description": f"the image, at most {THUMBNAIL_PX} px a side (PNG, or JPEG for a JPEG file); a "
                             "placeholder PNG, with the header X-Ctxsim-Placeholder (missing or unreadable), when "
                             "the file has moved or cannot be read",
              "content": {"image/png": image_content, "image/jpeg": image_content},
              "headers": {"Cache-Control": {"description": "private, no-cache (revalidate with the ETag); no-store "
                                                           "for a placeholder", "schema": {"type": "string"}},
                          "ETag": {"description": "the item's thumbnail in this index generation (not on a "
                                                  "placeholder)", "schema": {"type": "string"}},
                          "X-Ctxsim-Placeholder": {"description": "missing or unreadable: this is a placeholder",
                                                   "schema": {"type": "string", "enum": ["missing", "unreadable"]}}}},
        304: {"description": "not modified (If-None-Match names the current ETag)"},
        **responses({**unknown, 422: "not an integer id"})})
    async def thumbnail(request: Request, item_id: int = item_id_param()) -> Response:
        """The item's image shrunk on the server, by id only (the item table names the file)."""
        index = batcher.served[1]
        it = lookup(index, item_id)
        key = (index.info.path, index.info.generation, item_id)
        etag = f'"{hashlib.sha1(repr(key).encode()).hexdigest()[:20]}"'
        cached = cache.get(key)
        if cached is None:
            try:
                if not os.path.isfile(it.path):  # moved, or not a regular file: never open a FIFO or a device
                    raise FileNotFoundError(it.path)
                cached = await run_in_threadpool(render_thumbnail, it.path)
            except FileNotFoundError:
                return _placeholder_response(placeholders, "missing")
            except Exception:  # noqa: BLE001 - corrupt, over the decoding limits: show that, not a 500
                return _placeholder_response(placeholders, "unreadable")
            cache.put(key, cached)
        headers = {"Cache-Control": "private, no-cache", "ETag": etag}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        return Response(cached[0], media_type=cached[1], headers=headers)

    @router.get("/items/{item_id}/similar", response_model=SimilarBody,
                responses=responses({**unknown, 422: "not an integer id, or a bad k"}))
    async def similar(item_id: int = item_id_param(),
                      k: int = Query(default_k, ge=1, le=max_k, description="how many results")) -> dict:
        """More like this: the top-k of the item's stored embedding, with no upload and no re-embedding."""
        index = batcher.served[1]  # read once: a reload meanwhile does not mix generations
        it = lookup(index, item_id)
        try:
            query = np.asarray(index.embeddings[item_id], np.float32)[None, :]
        except ArtifactError:  # an index that keeps no embeddings: embed the item's file
            query = None
        if query is not None:
            scores, ids = await run_in_threadpool(index.search, query, k)
            items = index.items
            hits = [{"rank": j + 1, "score": float(s), "id": int(t), "path": items[t].path, "label": items[t].label}
                    for j, (s, t) in enumerate(zip(scores[0], ids[0])) if t >= 0]
            fingerprint = index.fingerprint
        else:
            from ctxsim.deploy.gallery import load_image

            try:
                image = await run_in_threadpool(load_image, it.path)
            except Exception as e:  # noqa: BLE001 - moved or unreadable: nothing to search with
                raise HTTPException(404, f"item {item_id}'s file cannot be read ({e}) and this index keeps no "
                                         "embeddings; rebuild the index") from None
            _, hits, fingerprint = await batcher.submit(image, k)
        return {"k": k, "results": hits, "fingerprint": fingerprint, "index_type": index.index_type,
                "generation": index.info.generation, "query": item_body(index, it)}

    @router.get("/model", response_model=ModelBody, responses=responses(None))
    async def model() -> dict:
        """The served model: fingerprint, kind, backend, precision and the parity verdict for its exact bytes."""
        embedder = batcher.served[0]
        known = models.get(id(embedder))
        if known is None or known[0] is not embedder:
            known = (embedder, await run_in_threadpool(describe_model, embedder))
            models.clear()  # one served model at a time (a followed model replaces it)
            models[id(embedder)] = known
        return known[1]

    return router


def _placeholder_response(placeholders: dict, reason: str) -> Any:
    from fastapi.responses import Response

    return Response(placeholders[reason], media_type="image/png",
                    headers={"Cache-Control": "no-store", "X-Ctxsim-Placeholder": reason})
