"""Helpers for the real-server tests: uvicorn on a free loopback port in a thread, and a tiny index to serve."""
from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def running(app):
    """uvicorn serving ``app`` on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


def png(w: int, h: int, seed: int = 0, mode: str = "L") -> bytes:
    """A PNG of w x h random pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def tiny_index(root: Path, run_dir: Path, classes: int = 3, per_class: int = 4) -> Path:
    """A flat index over ``classes`` x ``per_class`` random 28x28 PNGs embedded with ``run_dir``; returns its folder."""
    from ctxsim.deploy import build_index

    gallery = root / "gallery"
    for c in range(classes):
        (gallery / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (gallery / f"c{c}" / f"{i}.png").write_bytes(png(28, 28, seed=c * 100 + i))
    build_index(gallery, run_dir, root / "index", "flat")
    return root / "index"
