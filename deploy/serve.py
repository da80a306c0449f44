"""HTTP serving for one box: ``create_app`` (a FastAPI app: search, embed, health, info and metrics endpoints over a
dynamic batcher, with hot reload of new index generations) and ``serve`` (that app under uvicorn).

API: ``create_app(index_dir, model=None, token=None, ...)`` -> app; ``serve(index_dir, host, port, ...)`` (blocking);
``read_token_file(path)``. The pieces: ``ctxsim.deploy.routes`` (endpoints, errors, guard, OpenAPI),
``ctxsim.deploy.batcher`` (dynamic batching), ``ctxsim.deploy.reload`` (hot reload), ``ctxsim.deploy.page`` (the
search page), ``ctxsim.deploy.metrics`` (Prometheus) and ``ctxsim.deploy.threads`` (the thread policy). What each
endpoint does, its limits and errors: docs/ARCHITECTURE.md ("Serving") and docs/RELIABILITY.md.
"""
from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import os
import time
from pathlib import Path
from typing import Any

from ctxsim.deploy.batcher import DEFAULT_MAX_PIXELS, DynamicBatcher
from ctxsim.deploy.batcher import decode_upload as _decode  # noqa: F401 - the name benchmarks/ used
from ctxsim.deploy.page import PAGE_PATHS, page_router
from ctxsim.deploy.reload import IndexWatcher
from ctxsim.errors import ConfigError, MissingDependency

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "Batcher",
    "DynamicBatcher",
    "IndexWatcher",
    "create_app",
    "read_token_file",
    "serve",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MULTIPART_SLACK = 64 * 1024   # form fields and multipart boundaries on top of the image bytes
OPEN_PATHS = ("/healthz", *PAGE_PATHS)  # the search page holds no data (deploy/page.py)
Batcher = DynamicBatcher  # the name before the batcher moved to ctxsim.deploy.batcher


def _fastapi() -> None:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart, for uploads)
    except ImportError:
        raise MissingDependency("serving needs FastAPI: pip install 'ctxsim[serve]'") from None


def _check_settings(max_upload_bytes: int, max_pixels: int, token: str | None, reload_every_s: float) -> None:
    from ctxsim.data.limits import image_limits

    if max_upload_bytes < 1 or max_pixels < 1:
        raise ConfigError("max_upload_bytes and max_pixels must be positive")
    image_limits()  # a malformed CTXSIM_MAX_* variable stops the server now, not each request
    if token is not None and not token:
        raise ConfigError("token must be a non-empty string (or None for no authentication)")
    if reload_every_s < 0:
        raise ConfigError(f"reload_every_s must be >= 0 (0: never reload), got {reload_every_s}")


def _model_opener(device: str, max_batch: int, precision: str, compile: bool) -> Any:
    """path -> Embedder, at start-up and in the watcher's thread for a followed model; under the thread policy
    create_app applied (not applied again on each open)."""
    from ctxsim.deploy.embedder import Embedder

    def open_model(path: Any) -> Any:
        new = Embedder.from_artifact(path, device=device, batch_size=max(64, max_batch), precision=precision,
                                     compile=compile)
        if compile:  # build (and tune) the graphs now, not on the first requests
            logger.info("compiling %s for batches of 1 and %d (once; minutes with max-autotune on a GPU)",
                        path, new.batch_size)
            new.warm_up()
        return new
    return open_model


def _warn_unverified(embedder: Any) -> None:
    """A served artifact whose parity check failed, or has no verdict for its bytes: said, never silent."""
    from ctxsim.export.parity import recorded_verdict

    artifact = getattr(embedder, "artifact", "") or ""
    passed, failures = recorded_verdict(artifact)
    if passed is False:
        logger.warning("%s failed its parity check (%s): it may not retrieve what the trained model retrieves",
                       artifact or "the model", "; ".join(failures[:2]))
    elif passed is None and getattr(embedder, "kind", "torch") != "torch":  # a run folder is the reference itself
        logger.warning("%s has no parity verdict for its bytes (none recorded, or one of other bytes); check it "
                       "with `ctxsim parity` or `ctxsim verify`", artifact or "the model")


def create_app(index_dir: Any, model: Any = None, token: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_batch: int = 32, batch_wait_ms: float = 5.0, max_k: int = 1000, default_k: int = 10,
               device: str = "auto", reload_every_s: float = 2.0, precision: str = "fp32",
               compile: bool = False, follow_model: bool = False, threads: int | None = None) -> Any:
    """A FastAPI app serving ``index_dir`` (a folder or a loaded Index) with ``model`` (default: the index's).

    The model's fingerprint must match the index's (FingerprintMismatch otherwise). A folder is watched for new
    generations every ``reload_every_s`` seconds (0: never; ``follow_model``: a generation built with another model
    brings it along); a loaded Index is served as it is. ``precision`` and ``compile`` apply to a run folder served
    with PyTorch (see ``Embedder.from_artifact``). ``threads``: compute threads of the thread policy
    (``ctxsim.deploy.threads``; default ``CTXSIM_THREADS``, else the usable cores less one for the event loop).
    """
    _fastapi()
    from fastapi import FastAPI

    from ctxsim import __version__
    from ctxsim.deploy.embedder import open_index_model
    from ctxsim.deploy.index import Index, load_index
    from ctxsim.deploy.metrics import MetricsMiddleware, ServeMetrics
    from ctxsim.deploy.routes import (
        Guard,
        ServeContext,
        api_router,
        documented,
        install_error_handlers,
        install_openapi,
    )
    from ctxsim.deploy.threads import set_threads

    _check_settings(max_upload_bytes, max_pixels, token, reload_every_s)
    policy = set_threads(threads, reserve=1)  # default: a core for the event loop, the rest compute
    index = index_dir if isinstance(index_dir, Index) else load_index(index_dir)
    open_model = _model_opener(device, max_batch, precision, compile)
    embedder = open_index_model(index.info, model, opener=open_model)
    _warn_unverified(embedder)
    batcher = DynamicBatcher(embedder, index, max_batch=max_batch, wait_ms=batch_wait_ms, max_pixels=max_pixels,
                             decode_threads=policy.decode)
    watcher = IndexWatcher(index_dir, batcher, 0.0 if isinstance(index_dir, Index) else reload_every_s,
                           open_model if follow_model else None)
    metrics = ServeMetrics(max_batch, lambda: batcher.index.info, watcher.stats)
    metrics.watch(batcher)
    ctx = ServeContext(batcher=batcher, watcher=watcher, metrics=metrics, token=token,
                       max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_k=max_k, default_k=default_k,
                       started=time.time(), threads=policy)

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
    app.state.ctxsim, app.state.batcher, app.state.watcher, app.state.metrics = ctx, batcher, watcher, metrics
    install_error_handlers(app)
    install_openapi(app, ctx, OPEN_PATHS)
    app.include_router(api_router(ctx))  # POST /search, /embed; GET /healthz, /info, /metrics
    app.include_router(page_router(batcher, documented(ctx), max_k=max_k, default_k=default_k))  # GET /, /items/...
    app.add_middleware(Guard, token=token, max_body=max_upload_bytes + MULTIPART_SLACK, open_paths=OPEN_PATHS)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts what the guard refuses too
    return app


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path`` (first line, surrounding whitespace stripped): a secret kept out of the process
    list, where ``--token VALUE`` would show it. ConfigError (one line) when unreadable or empty."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the token file {path} ({type(e).__name__}); give a readable text "
                          "file") from None
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
          follow_model: bool = False, threads: int | None = None, access_log: bool = False) -> None:
    """Serve ``index_dir`` over HTTP with uvicorn (blocking). Loopback only unless ``host`` says otherwise.
    ``access_log``: uvicorn's line per request (off by default: it costs more than a small model's inference).
    uvicorn uses uvloop and httptools when they are installed."""
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
                     precision=precision, compile=compile, follow_model=follow_model, threads=threads)
    logger.info("threads: %s", app.state.ctxsim.threads.describe())
    gc.collect()
    gc.freeze()  # what start-up loaded (model, index, libraries) is never scanned again: short GC pauses under load
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)
