"""The HTTP surface of ``ctxsim serve``: endpoints, error bodies, the token and size guard, the OpenAPI schema.

``api_router(ctx)`` holds the endpoints (``POST /search``, ``POST /embed``, ``GET /healthz``, ``GET /info``,
``GET /metrics``); they read the served state from ``request.app.state.ctxsim`` (a :class:`ServeContext`).
``install_error_handlers(app)`` makes every error a JSON ``{"error": ...}`` body, ``Guard`` checks the bearer token
and the body size before a byte of the body is parsed, and ``install_openapi(app, ctx)`` completes the generated
schema with what the handlers' signatures cannot say (see docs/ARCHITECTURE.md, "Serving").

An upload is either multipart/form-data (field ``image``; ``file`` is a legacy alias, not both; ``k`` as a form
field or query parameter) or the image itself as the body with ``Content-Type: image/...`` (``k`` as a query
parameter). The endpoints only read the bytes: decoding happens in the batcher's worker thread.
"""
# No ``from __future__ import annotations``: FastAPI reads the endpoints' ``request: Request`` at runtime. This module
# imports Starlette and FastAPI, so ctxsim.deploy.serve imports it only when an app is created.
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ctxsim.deploy.batcher import HTTPError, refused
from ctxsim.errors import DataError, ImageRefused

__all__ = [
    "OPEN_PATHS",
    "Guard",
    "ServeContext",
    "api_router",
    "complete_openapi",
    "documented",
    "dumps",
    "install_error_handlers",
    "install_openapi",
    "json_response",
]

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz",)  # never need the token (load balancers); the app adds its search page's

try:  # the fastest JSON encoder installed; the standard library's otherwise
    import orjson as _orjson

    def dumps(obj: Any) -> bytes:
        """``obj`` as compact JSON bytes (orjson when installed)."""
        return _orjson.dumps(obj)
except ImportError:
    _encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

    def dumps(obj: Any) -> bytes:
        """``obj`` as compact JSON bytes (orjson when installed)."""
        return _encode(obj).encode("utf-8")


@dataclass
class ServeContext:
    """What the endpoints serve and their limits (``app.state.ctxsim``)."""

    batcher: Any
    watcher: Any
    metrics: Any
    token: str | None
    max_upload_bytes: int
    max_pixels: int
    max_k: int
    default_k: int
    started: float
    threads: Any = None  # the ThreadPolicy in force


class FastJSON(Response):
    """A JSON response rendered by :func:`dumps`."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def json_response(content: Any, status: int = 200, headers: Any = None) -> Response:
    """A JSON response rendered by :func:`dumps`."""
    return FastJSON(content, status_code=status, headers=headers)


def error_response(status: int, message: str, extra: dict | None = None, headers: Any = None) -> Response:
    return json_response({"error": message, **(extra or {})}, status, headers)


# ---------------------------------------------------------------------------------------------- guard
class Guard:
    """Pure ASGI middleware: bearer token and request-size limits, enforced before the body is parsed."""

    def __init__(self, app: Any, token: str | None, max_body: int, open_paths: tuple = OPEN_PATHS) -> None:
        self.app, self.token, self.max_body, self.open_paths = app, token, max_body, tuple(open_paths)
        self._token = token.encode() if token is not None else b""

    @staticmethod
    async def _reply(send: Any, status: int, message: str, headers: list | None = None) -> None:
        body = dumps({"error": message})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        auth = cl = None
        for k, v in scope.get("headers", ()):
            k = k.lower()
            if k == b"authorization":
                auth = v
            elif k == b"content-length":
                cl = v
        if self.token is not None and scope.get("path") not in self.open_paths:
            scheme, _, given = (auth or b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
                await self._reply(send, 401, "missing or wrong bearer token; send 'Authorization: Bearer <token>'",
                                  [(b"www-authenticate", b"Bearer")])
                return
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
            await self.app(scope, receive, send)  # the server stops reading at Content-Length
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


# ---------------------------------------------------------------------------------------------- errors
def install_error_handlers(app: Any) -> None:
    """Every error as JSON ``{"error": ...}`` (an image refused by a limit also names it); 405 keeps ``Allow``."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def own(_: Any, e: HTTPError) -> Any:
        return error_response(e.status, e.message, e.extra)

    async def http(_: Any, e: StarletteHTTPException) -> Any:
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    async def data(_: Any, e: DataError) -> Any:  # an image the batcher refused: its request alone
        if isinstance(e, ImageRefused):
            r = refused(e)
            return error_response(r.status, r.message, r.extra)
        return error_response(400, str(e))

    async def invalid(_: Any, e: RequestValidationError) -> Any:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return error_response(422, "; ".join(parts) or "invalid request")

    async def crash(_: Any, e: Exception) -> Any:
        logger.exception("request failed")
        return error_response(500, f"internal error ({type(e).__name__})")

    app.add_exception_handler(HTTPError, own)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(DataError, data)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, crash)


# ---------------------------------------------------------------------------------------------- uploads
_int_adapter: Any = None


def _parse_k(raw: Any, ctx: ServeContext) -> int:
    """``k`` as FastAPI/pydantic reads an integer ("3", " 3 ", "3.0"; not "3.5"), within 1..max_k; else 422."""
    global _int_adapter
    if _int_adapter is None:
        from pydantic import TypeAdapter

        _int_adapter = TypeAdapter(int)
    try:
        k = _int_adapter.validate_python(raw)
    except Exception:  # noqa: BLE001 - pydantic.ValidationError
        raise HTTPError(422, f"k: input should be a valid integer, got {str(raw)[:40]!r}") from None
    if not 1 <= k <= ctx.max_k:
        raise HTTPError(422, f"k must be between 1 and {ctx.max_k}, got {k}")
    return k


async def _read_upload(request: Request, ctx: ServeContext) -> tuple[bytes, Any]:
    """(the uploaded image's bytes, the ``k`` form field or None): multipart or a raw ``image/*`` body; over
    ``max_upload_bytes`` is 413."""
    data, k = await _upload_and_k(request, ctx)
    if len(data) > ctx.max_upload_bytes:
        raise HTTPError(413, f"upload exceeds the limit of {ctx.max_upload_bytes} bytes")
    return data, k


async def _upload_and_k(request: Request, ctx: ServeContext) -> tuple[bytes, Any]:
    ctype = request.headers.get("content-type", "")
    media = ctype.partition(";")[0].strip().lower()
    if media.startswith("image/"):
        return await request.body(), None
    form = await request.form()  # multipart (and urlencoded) parsed; anything else: empty
    try:
        image, file, k = form.get("image"), form.get("file"), form.get("k")
        if image is not None and file is not None:
            raise HTTPError(422, "two images uploaded; send one, in the 'image' field (or 'file'), not both")
        up = image if image is not None else file
        if up is None:
            raise HTTPError(422, "no image uploaded; send multipart/form-data with an 'image' file field, or the "
                                 "image itself with Content-Type image/...")
        if isinstance(up, str):
            raise HTTPError(422, "the 'image' part is not a file; send it as a file part (with a filename)")
        data = await up.read(ctx.max_upload_bytes + 1)  # one byte over is enough to refuse it
        if not isinstance(k, (str, type(None))):
            raise HTTPError(422, "k must be a form field, not a file")
        return data, (None if k == "" else k)  # an empty form field is an absent one, as FastAPI reads forms
    finally:
        await form.close()


# ---------------------------------------------------------------------------------------------- endpoints
def _client(request: Request) -> Any:
    """The request's connection (host, port): a keep-alive client the batcher may expect back."""
    client = request.scope.get("client")
    return tuple(client) if client else None


async def search_ep(request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctxsim
    k_query = request.query_params.get("k")
    with ctx.batcher.arriving():
        data, k_form = await _read_upload(request, ctx)
        k = ctx.default_k if k_query is None else _parse_k(k_query, ctx)  # checked even when the form's k wins
        if k_form is not None:
            k = _parse_k(k_form, ctx)
    _, hits, fingerprint = await ctx.batcher.submit(data, k, _client(request))
    return json_response({"k": k, "results": hits, "fingerprint": fingerprint,
                          "index_type": ctx.batcher.index.index_type})


async def embed_ep(request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctxsim
    with ctx.batcher.arriving():
        data, _ = await _read_upload(request, ctx)
    vec, _, fingerprint = await ctx.batcher.submit(data, None, _client(request))
    return json_response({"embedding": vec.tolist(), "dim": int(vec.shape[0]), "fingerprint": fingerprint})


async def healthz() -> Response:
    return json_response({"status": "ok"})


async def info(request: Request) -> Response:
    from ctxsim import __version__
    from ctxsim.data.limits import image_limits

    ctx: ServeContext = request.app.state.ctxsim
    served, i = ctx.batcher.embedder, ctx.batcher.index.info
    threads = ctx.threads
    return json_response({
        "fingerprint": served.fingerprint, "backend": served.backend, "dim": i.dim,
        "index": {"type": i.index_type, "count": i.count, "dim": i.dim, "params": i.params, "metric": i.metric,
                  "fingerprint": i.fingerprint, "updated": i.updated, "generation": i.generation},
        "batching": ctx.batcher.stats(), "reload": ctx.watcher.stats(),
        "limits": {"max_upload_bytes": ctx.max_upload_bytes, "max_pixels": ctx.max_pixels, "max_k": ctx.max_k,
                   "max_aspect_ratio": image_limits()[1]},
        "threads": None if threads is None else {"threads": threads.threads, "interop": threads.interop,
                                                 "spin": threads.spin, "decode": threads.decode},
        "ctxsim_version": __version__, "uptime_s": round(time.time() - ctx.started, 1)})


async def metrics_ep(request: Request) -> Response:
    body, content_type = request.app.state.ctxsim.metrics.render()
    return Response(content=body, media_type=content_type)


# ---------------------------------------------------------------------------------------------- router
def _documented(ctx: ServeContext, codes: dict | None = None) -> dict:
    """{status: description} -> FastAPI ``responses``, every error body an ``ErrorBody``; 401 with a token."""
    out: dict[int | str, Any] = {}
    for code, description in {**(codes or {}), **({401: "missing or wrong bearer token"} if ctx.token else {})}.items():
        out[code] = {"description": description,
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    return out


def documented(ctx: ServeContext) -> Callable[[dict | None], dict]:
    """``codes -> responses`` for other routers of the app (the search page), documented like these endpoints."""
    def responses(codes: dict | None = None) -> dict:
        return _documented(ctx, codes)
    return responses


def _ok(description: str, schema: dict) -> dict:
    return {200: {"description": description, "content": {"application/json": {"schema": schema}}}}


HIT = {"type": "object", "required": ["rank", "score", "id", "path", "label"],
       "properties": {"rank": {"type": "integer"}, "score": {"type": "number"}, "id": {"type": "integer"},
                      "path": {"type": "string"}, "label": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
SEARCH_RESULT = {"type": "object", "required": ["k", "results", "fingerprint", "index_type"],
                 "properties": {"k": {"type": "integer"}, "results": {"type": "array", "items": HIT},
                                "fingerprint": {"type": "string"}, "index_type": {"type": "string"}}}
EMBED_RESULT = {"type": "object", "required": ["embedding", "dim", "fingerprint"],
                "properties": {"embedding": {"type": "array", "items": {"type": "number"}},
                               "dim": {"type": "integer"}, "fingerprint": {"type": "string"}}}
OBJECT = {"type": "object", "additionalProperties": True}


def api_router(ctx: ServeContext) -> Any:
    """The endpoints, documented for ``ctx``'s limits and token."""
    from fastapi import APIRouter

    upload_errors = _documented(ctx, {
        400: "invalid multipart data, an empty upload or corrupt image data",
        413: f"a request body over {ctx.max_upload_bytes} bytes, or an image over max_pixels ({ctx.max_pixels}); "
             "the body names the limit",
        415: "not a readable image",
        422: "no image uploaded, a bad k, or an image refused by its shape (aspect ratio over max_aspect_ratio, "
             "or no pixels); the body names the limit",
        500: "internal error, or the model embedded the image as NaN or inf"})
    r = APIRouter()
    r.add_api_route("/healthz", healthz, methods=["GET"], responses=_ok("the server is up", OBJECT))
    r.add_api_route("/info", info, methods=["GET"], responses={**_ok("model, index, batching, reload state",
                                                                     OBJECT), **_documented(ctx)})
    r.add_api_route("/metrics", metrics_ep, methods=["GET"], response_class=PlainTextResponse, responses={
        **_documented(ctx), 200: {"description": "Prometheus text exposition format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}})
    r.add_api_route("/search", search_ep, methods=["POST"], operation_id="search_ep_search_post",
                    responses={**_ok("the k nearest neighbours", SEARCH_RESULT), **upload_errors})
    r.add_api_route("/embed", embed_ep, methods=["POST"], operation_id="embed_ep_embed_post",
                    responses={**_ok("the embedding", EMBED_RESULT), **upload_errors})
    return r


# ---------------------------------------------------------------------------------------------- OpenAPI
def _upload_body(form_schema: str) -> dict:
    return {"required": True, "content": {
        "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{form_schema}"}},
        "image/*": {"schema": {"type": "string", "format": "binary",
                               "description": "the image file itself (JPEG, PNG, WebP, BMP, GIF, TIFF, ...)"}}}}


def complete_openapi(schema: dict, ctx: ServeContext, open_paths: tuple = OPEN_PATHS) -> dict:
    """What the handlers' signatures cannot say, added in place: the two upload bodies (multipart field ``image``,
    or the raw image as ``image/*``), ``k`` (an integer when sent, optional, not nullable), the error body, and with
    a token the bearer scheme every operation but /healthz needs.

    The legacy field name ``file`` (an alias of ``image``; sending both is a 422) is named in each operation's
    description, not in the schema: a body schema offering either of two fields needs ``oneOf``/``anyOf`` over
    ``required``, which Schemathesis 4 (our conformance test) cannot fuzz for binary parts."""
    k = {"title": "K", "type": "integer", "minimum": 1, "maximum": ctx.max_k}
    image = {"type": "string", "format": "binary", "description": "the image file"}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["SearchUpload"] = {"type": "object", "title": "SearchUpload", "required": ["image"],
                                  "properties": {"image": image, "k": k}}
    components["EmbedUpload"] = {"type": "object", "title": "EmbedUpload", "required": ["image"],
                                 "properties": {"image": image}}
    components["ErrorBody"] = {
        "type": "object", "title": "ErrorBody", "required": ["error"],
        "description": "Every error: a one-line message; an image refused by a decoding limit also names the limit.",
        "properties": {"error": {"type": "string"}, "limit": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                       "maximum": {"anyOf": [{"type": "number"}, {"type": "null"}]},
                       "value": {"anyOf": [{"type": "number"}, {"type": "null"}]}}}
    for path, form in (("/search", "SearchUpload"), ("/embed", "EmbedUpload")):
        op = schema["paths"][path]["post"]
        op["description"] = ("Upload the image as the multipart field `image` (JPEG, PNG, WebP, BMP, GIF, TIFF, ...); "
                             "`file` is accepted as a legacy alias (send one of the two). Or send the image itself "
                             "as the request body with `Content-Type: image/...` (e.g. `image/jpeg`)"
                             + (", `k` as a query parameter." if path == "/search" else "."))
        op["requestBody"] = _upload_body(form)
        if path == "/search":
            op["parameters"] = [{"name": "k", "in": "query", "required": False, "schema": dict(k),
                                 "description": f"neighbours to return (default {ctx.default_k}); a `k` form "
                                                "field wins over it"}]
    for item in schema["paths"].values():  # error bodies are JSON, also where the success is text (/metrics)
        for op in item.values():
            for code, resp in op.get("responses", {}).items():
                content = resp.get("content", {})
                if not code.startswith("2") and "text/plain" in content and "application/json" not in content:
                    content["application/json"] = content.pop("text/plain")
    if ctx.token is not None:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        for path in open_paths:
            for op in schema["paths"].get(path, {}).values():
                op["security"] = []
    return schema


def install_openapi(app: Any, ctx: ServeContext, open_paths: tuple = OPEN_PATHS) -> None:
    """``app.openapi`` = FastAPI's generated schema completed by :func:`complete_openapi` (built once)."""
    from fastapi import FastAPI

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = complete_openapi(FastAPI.openapi(app), ctx, open_paths)
        return app.openapi_schema

    app.openapi = openapi
