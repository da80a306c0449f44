"""Prometheus metrics of ``ctxsim serve``: one registry per app, served at ``GET /metrics``.

- ``ctxsim_requests_total{path, status}`` and ``ctxsim_request_seconds{path}``: every HTTP request, refused ones
  (401, 413) included, timed from the first byte in to the last byte out;
- ``ctxsim_batch_size`` and ``ctxsim_batch_seconds``: each dynamic batch the worker decoded, embedded (and searched);
- ``ctxsim_queue_wait_seconds``: per request, from its upload being handed to the batcher to its batch starting;
  ``ctxsim_decode_seconds``: per upload, decoding it (in the batch worker); ``ctxsim_queue_depth``: requests
  waiting for a batch, read when scraped;
- ``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ...: the server process (Linux; prometheus
  client's process collector), so CPU per request is ``rate(process_cpu_seconds_total) /
  rate(ctxsim_requests_total)``;
- ``ctxsim_nonfinite_embeddings_total``: images the model embedded as NaN or inf (each such request got 500);
- ``ctxsim_index_items``, ``ctxsim_index_generation``, ``ctxsim_index_reloads_total``,
  ``ctxsim_index_reload_failures_total``: the served index, read when scraped.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ctxsim.errors import MissingDependency

PATHS = ("/search", "/embed", "/info", "/healthz", "/metrics")  # anything else is labelled "other"


class ServeMetrics:
    """The app's metrics (``MetricsMiddleware`` feeds the request ones; ``observe_batch`` is the batcher's hook)."""

    def __init__(self, max_batch: int, index_info: Callable[[], Any], reload_stats: Callable[[], dict]) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
        except ImportError:
            raise MissingDependency("serving needs prometheus-client: pip install 'ctxsim[serve]'") from None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ctxsim_requests", "HTTP requests", ["path", "status"], registry=r)
        self.seconds = Histogram("ctxsim_request_seconds", "HTTP request time", ["path"], registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, int(max_batch)})
        self.batch_size = Histogram("ctxsim_batch_size", "images per embedded batch", registry=r,
                                    buckets=[s for s in sizes if s <= max_batch])
        self.batch_seconds = Histogram("ctxsim_batch_seconds", "time to embed (and search) one batch", registry=r,
                                       buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        fine = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
        self.queue_wait = Histogram("ctxsim_queue_wait_seconds", "time a request waited for its batch to start",
                                    registry=r, buckets=fine)
        self.decode_seconds = Histogram("ctxsim_decode_seconds", "time to decode one upload", registry=r,
                                        buckets=fine)
        self.queue_depth = Gauge("ctxsim_queue_depth", "requests waiting for a batch", registry=r)
        ProcessCollector(registry=r)
        self._requests: dict[tuple[str, int], Any] = {}  # (path label, status) -> counter child
        self._seconds: dict[str, Any] = {}
        self.nonfinite = Counter("ctxsim_nonfinite_embeddings", "images embedded as NaN or inf (answered 500)",
                                 registry=r)
        Gauge("ctxsim_index_items", "items in the served index", registry=r).set_function(
            lambda: index_info().count)
        Gauge("ctxsim_index_generation", "generation of the served index", registry=r).set_function(
            lambda: index_info().generation)
        Gauge("ctxsim_index_reloads_total", "index generations swapped in since start", registry=r).set_function(
            lambda: reload_stats()["reloads"])
        Gauge("ctxsim_index_reload_failures_total", "index generations refused since start",
              registry=r).set_function(lambda: reload_stats()["failures"])

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_nonfinite(self, count: int) -> None:
        self.nonfinite.inc(count)

    def watch(self, batcher: Any) -> None:
        """Feed this registry from ``batcher``'s hooks (batches, NaN/inf rows, queue waits, decodes, queue depth)."""
        batcher.on_batch = self.observe_batch
        batcher.on_nonfinite = self.observe_nonfinite
        batcher.on_queue_wait = self.queue_wait.observe
        batcher.on_decode = self.decode_seconds.observe
        self.queue_depth.set_function(lambda: batcher.queue_depth)

    def observe_request(self, label: str, status: int, seconds: float) -> None:
        key = (label, status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(label, str(status))
        counter.inc()
        hist = self._seconds.get(label)
        if hist is None:
            hist = self._seconds[label] = self.seconds.labels(label)
        hist.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware recording each HTTP request's status and time into ``metrics`` (added last, so it
    sees the requests the token and size guard refuse)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in PATHS else "other"
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(label, status["code"], time.perf_counter() - t0)
