"""Serving throughput: a real `ctxsim serve` on loopback, driven by a light load generator in another process.

What it measures, for PNG and JPEG queries at each concurrency (default 1, 8, 32; a fixed number of requests each):

- requests/s and p50/p99 latency as the load generator sees them (``POST /search``, multipart, ``k`` 10);
- server CPU-ms per request: the server process's own utime + stime (``/proc/<pid>/stat``), read just before and
  just after each load phase;
- the mean dynamic batch size: the change of ``ctxsim_batch_size_sum`` / ``ctxsim_batch_size_count`` in ``/metrics``
  across the phase (the batch-size histogram's deltas go into the JSON);
- the load generator's own CPU-ms per request (``time.process_time()`` in its process). On a machine with few cores it
  competes with the server, so requests/s is also given with its CPU removed: N / (wall - generator CPU / cores);
- the ceiling: the same pipeline in this process (the server's decode, ``Embedder.embed``, ``Index.search``) on the
  same bytes, in batches of 32 and one image at a time: CPU-ms per image (``time.process_time``; per stage too),
  images/s and the single-image latency, measured once per round between the load phases (the server idles).

Headline: in-process CPU per image (batch 32) / server CPU per request (1.0 = the server adds nothing; the issue's
target is >= 0.5). The other targets are checked line by line: at concurrency 1, p50 <= in-process single-image p50
+ 1 ms; at concurrency 32, mean batch >= 16 and requests/s >= 50% of in-process images/s.

Correctness: the neighbour ids the server returns for every distinct query (first response of each, in every
phase) must equal the in-process ones (score differences <= 1e-4 count as near-tie reorders); the run exits with
status 1 when they do not.

Default set-up (a fresh clone, no arguments): the omniglot-mini recipe's ConvNet (28 px greyscale, 64-d) trained
for one epoch on the sample shipped in the package, exported to ONNX (with its parity check), a flat index over
the 2,960 held-out drawings written as PNG files, all in a temporary folder. Queries: 64 of those drawings,
re-encoded as PNG and as JPEG (quality 90). Writes benchmarks/results/serve_throughput.md and .json.

    python benchmarks/serve_throughput.py                        # build, serve, measure (a minute or two)
    python benchmarks/serve_throughput.py --index runs/demo/index  # an existing index (its model, or --model)
    python benchmarks/serve_throughput.py --url http://127.0.0.1:8000 --index runs/demo/index --server-pid PID
        # drive a server that is already running (server CPU only with --server-pid; /metrics deltas include any
        # other traffic it gets)
    python benchmarks/serve_throughput.py --baseline /tmp/before/pkg
        # also serve with the ctxsim found on that PYTHONPATH (e.g. an older checkout), side by side: every round
        # runs each phase against both servers, alternating which goes first
    python benchmarks/serve_throughput.py --body raw       # the image itself as the body (Content-Type image/...)
    python benchmarks/serve_throughput.py --index IDX --model RUN --device cuda --precision bf16 --compile
        # the GPU paths: a run folder in bf16 with torch.compile, or an ONNX model on CUDA (--device cuda)
"""
from __future__ import annotations

# Only the standard library at module level: the load generator runs in a spawned process that imports this file.
import argparse
import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NEAR_TIE = 1e-4


# ------------------------------------------------------------------------------------------- load generator
def _loadgen(conn: Any, host: str, port: int, requests: list[bytes], total: int, concurrency: int) -> None:
    """Runs in its own process: ``concurrency`` keep-alive connections (asyncio streams, one thread) send
    ``total`` prebuilt requests (request i is ``requests[i % len]``). Reports latencies, statuses, its own CPU and
    the first response body of each distinct request."""
    async def main() -> dict:
        streams = [await asyncio.open_connection(host, port) for _ in range(concurrency)]
        loop = asyncio.get_running_loop()
        conn.send(("ready",))
        await loop.run_in_executor(None, conn.recv)  # "go": the parent has read the server's CPU counters
        lat = [0.0] * total
        status = [0] * total
        bodies: dict[int, bytes] = {}
        errors: list[str] = []
        nxt = 0
        cpu0, t0 = time.process_time(), time.perf_counter()  # all of this process's threads, ns resolution

        async def worker(slot: int) -> None:
            nonlocal nxt
            reader, writer = streams[slot]
            while nxt < total:
                i = nxt
                nxt += 1
                q = i % len(requests)
                ts = time.perf_counter()
                try:
                    writer.write(requests[q])
                    await writer.drain()
                    head = await reader.readuntil(b"\r\n\r\n")
                    code = int(head.split(b" ", 2)[1])
                    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                    if m is None:
                        raise RuntimeError("response without Content-Length")
                    body = await reader.readexactly(int(m.group(1)))
                except Exception as e:  # noqa: BLE001 - counted; reconnect and go on
                    errors.append(f"{type(e).__name__}: {e}")
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                lat[i] = time.perf_counter() - ts
                status[i] = code
                if q not in bodies:
                    bodies[q] = body

        await asyncio.gather(*(worker(s) for s in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        for _, w in streams:
            w.close()
        return {"wall_s": wall, "cpu_s": cpu, "latencies_s": lat,
                "status": status, "bodies": bodies, "errors": errors[:20], "n_errors": len(errors)}

    try:
        conn.send(("done", asyncio.run(main())))
    except Exception as e:  # noqa: BLE001 - the parent reports it
        conn.send(("error", f"{type(e).__name__}: {e}"))


def build_request(host: str, port: int, data: bytes, fmt: str, k: int, token: str | None,
                  body: str = "multipart") -> bytes:
    """One raw ``POST /search`` request: multipart with the field ``image`` and the form field ``k``, or (``body``
    "raw") the image itself with ``Content-Type: image/<fmt>`` and ``k`` in the query."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    if body == "raw":
        return (f"POST /search?k={k} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/{fmt}\r\n"
                f"Content-Length: {len(data)}\r\n{auth}\r\n").encode() + data
    boundary = "ctxsimbench7d1f0c"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.{fmt}\"\r\n"
            f"Content-Type: image/{fmt}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /search HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
            + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n")
    return head.encode() + body


# ------------------------------------------------------------------------------------------- server side
def proc_cpu_s(pid: int | None) -> float | None:
    """utime + stime of process ``pid`` (all its threads) in seconds, from /proc/<pid>/stat; None if unreadable."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15 of stat(5)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def aggregate(rounds: list[dict]) -> dict:
    """One (format, concurrency) cell over its rounds: the median of each figure, failures summed."""
    import statistics

    def med(key: str) -> float | None:
        xs = [r[key] for r in rounds if r[key] is not None]
        return float(statistics.median(xs)) if xs else None

    first = rounds[0]
    out: dict[str, Any] = {"server": first.get("server", "served"), "format": first["format"],
                           "concurrency": first["concurrency"],
                           "requests": first["requests"], "rounds": len(rounds),
                           "failed": sum(r["requests"] - r["ok"] for r in rounds)}
    for key in ("rps", "rps_wo_generator", "p50_ms", "p99_ms", "mean_ms", "server_cpu_ms_per_request",
                "loadgen_cpu_ms_per_request", "mean_batch"):
        out[key] = med(key)
        out[f"{key}_per_round"] = [r[key] for r in rounds]
    return out


def http_get(host: str, port: int, path: str, token: str | None, timeout: float = 10.0) -> tuple[int, bytes]:
    import http.client

    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def scrape(host: str, port: int, token: str | None) -> dict[str, float]:
    """The /metrics samples this benchmark uses: {'name{labels}': value}."""
    status, body = http_get(host, port, "/metrics", token)
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith(("ctxsim_batch_size", "ctxsim_requests_total")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def start_server(index: Path, model: Path | None, args: argparse.Namespace, log: Path, pythonpath: str | None = None,
                 extra: list[str] | None = None) -> tuple[subprocess.Popen, int]:
    """`python -m ctxsim.cli serve INDEX` on a free loopback port; returns (process, port) once /healthz answers.
    ``pythonpath``: put this first on the server's PYTHONPATH (a baseline checkout); ``extra``: more serve options."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cmd = [sys.executable, "-m", "ctxsim.cli", "serve", str(index), "--host", "127.0.0.1", "--port", str(port),
           "--device", args.device, "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]
    if model is not None:
        cmd += ["--model", str(model)]
    if args.precision != "fp32":
        cmd += ["--precision", args.precision]
    if args.compile:
        cmd += ["--compile"]
    cmd += extra or []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, *filter(None, [os.environ.get("PYTHONPATH")])])
    print("starting:", " ".join(cmd[1:]), f"(PYTHONPATH={pythonpath})" if pythonpath else "", flush=True)
    fh = open(log, "wb")  # noqa: SIM115 - the server writes its (access) log here for its whole life
    # a baseline starts in the log's folder: from a checkout's root, `-m` would find that checkout's ctxsim/ first
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=log.parent if pythonpath else None)
    deadline = time.time() + args.start_timeout
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http_get("127.0.0.1", port, "/healthz", None, timeout=2)[0] == 200:
                return proc, port
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            sys.exit(f"the server did not answer /healthz within {args.start_timeout:.0f} s:\n"
                     f"{log.read_text()[-3000:]}")
        time.sleep(0.2)


def run_phase(host: str, port: int, requests: list[bytes], total: int, concurrency: int, pid: int | None,
              token: str | None) -> dict:
    """One load phase: metrics and server CPU before, the generator's run, server CPU and metrics after."""
    import multiprocessing as mp

    import numpy as np

    ctx = mp.get_context("spawn")  # a fresh interpreter: none of this process's threads or imports
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_loadgen, args=(child, host, port, requests, total, concurrency), daemon=True)
    m0 = scrape(host, port, token)
    p.start()
    msg = parent.recv()
    if msg[0] != "ready":
        p.join()
        sys.exit(f"load generator failed: {msg[1]}")
    c0 = proc_cpu_s(pid)
    parent.send("go")
    msg = parent.recv()
    c1 = proc_cpu_s(pid)
    p.join()
    if msg[0] != "done":
        sys.exit(f"load generator failed: {msg[1]}")
    m1 = scrape(host, port, token)
    r = msg[1]
    ok = [i for i, s in enumerate(r["status"]) if s == 200]
    lat = np.array([r["latencies_s"][i] for i in ok]) * 1e3
    delta = {key: m1.get(key, 0.0) - m0.get(key, 0.0) for key in m1}
    batches = delta.get("ctxsim_batch_size_count", 0.0)
    images = delta.get("ctxsim_batch_size_sum", 0.0)
    hist = {re.search(r'le="([^"]+)"', key).group(1): v for key, v in delta.items()  # type: ignore[union-attr]
            if key.startswith("ctxsim_batch_size_bucket")}
    wall = r["wall_s"]
    return {
        "concurrency": concurrency, "requests": total, "ok": len(ok),
        "non_200": {str(s): r["status"].count(s) for s in set(r["status"]) if s != 200},
        "transport_errors": r["n_errors"], "error_samples": r["errors"],
        "wall_s": wall, "rps": len(ok) / wall,
        "rps_wo_generator": len(ok) / max(1e-9, wall - r["cpu_s"] / _cores()),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_ms": float(lat.mean()) if len(lat) else None,
        "server_cpu_s": None if c0 is None or c1 is None else c1 - c0,
        "server_cpu_ms_per_request": None if c0 is None or c1 is None else 1e3 * (c1 - c0) / max(1, total),
        "loadgen_cpu_s": r["cpu_s"], "loadgen_cpu_ms_per_request": 1e3 * r["cpu_s"] / max(1, total),
        "batches": batches, "batched_images": images,
        "mean_batch": images / batches if batches else None,
        "batch_size_histogram_cumulative": hist,
        "bodies": r["bodies"],
    }


# ------------------------------------------------------------------------------------------- set-up
def build_default(root: Path, epochs: int, seed: int) -> tuple[Path, Path]:
    """(index folder, model) in ``root``: the omniglot-mini ConvNet (``epochs`` epochs of training; 0: its seeded
    initial weights), exported to ONNX with parity, and a flat index over the held-out drawings as PNG files."""
    import torch
    import yaml

    from ctxsim.config import resolve_config
    from ctxsim.data.pipeline import open_eval_dataset
    from ctxsim.deploy.index import build_index
    from ctxsim.export import export_run
    from ctxsim.nets import EmbeddingNet, save_model
    from ctxsim.train import train

    t0 = time.perf_counter()
    cfg = resolve_config("omniglot-mini", overrides={"seed": seed, "epochs": max(1, epochs)})
    run = root / "run"
    if epochs > 0:
        print(f"training the omniglot-mini ConvNet for {epochs} epoch(s) ...", flush=True)
        train(cfg, run)
    else:
        torch.manual_seed(seed)
        run.mkdir(parents=True)
        save_model(run, EmbeddingNet(cfg.model), cfg.preprocess)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(f"  {time.perf_counter() - t0:.1f} s; exporting to ONNX (+ parity) ...", flush=True)
    exported = export_run(run, run / "export", fp16=False, parity=True, parity_limit=500)
    print(f"  {time.perf_counter() - t0:.1f} s; writing the gallery and building a flat index ...", flush=True)
    test = open_eval_dataset(cfg, cfg.preprocess)
    gallery = root / "gallery"
    for i in range(len(test)):
        d = gallery / test.class_names[test.labels[i]].replace("/", "__")
        d.mkdir(parents=True, exist_ok=True)
        test.load_image(i).save(d / f"{i:05d}.png")
    build_index(gallery, exported.onnx_path, root / "index", index_type="flat")
    print(f"  set-up done in {time.perf_counter() - t0:.1f} s", flush=True)
    return root / "index", Path(exported.onnx_path)


def encode_queries(paths: list[str], n: int, quality: int) -> dict[str, list[bytes]]:
    """``n`` gallery images spread over the list, each encoded as PNG and as JPEG (``quality``)."""
    from ctxsim.deploy.gallery import load_image

    step = max(1, len(paths) // n)
    out: dict[str, list[bytes]] = {"png": [], "jpeg": []}
    for p in paths[::step][:n]:
        im = load_image(p)
        for fmt, encoded in out.items():
            buf = io.BytesIO()
            im.save(buf, format=fmt.upper(), **({"quality": quality} if fmt == "jpeg" else {}))
            encoded.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------------- in process
class InProcess:
    """The server's pipeline in this process on the same bytes: decode (the server's own function), embed,
    search; in batches of ``batch`` and one image at a time."""

    def __init__(self, embedder: Any, index: Any, k: int, batch: int = 32) -> None:
        self.embedder, self.index, self.k, self.batch = embedder, index, k, batch
        try:  # exactly what the server runs on an upload
            from ctxsim.deploy.batcher import DEFAULT_MAX_PIXELS, decode_upload

            self.decode = lambda b: decode_upload(b, DEFAULT_MAX_PIXELS)
        except ImportError:  # an older checkout: the public equivalent
            from ctxsim.deploy.gallery import load_image

            self.decode = load_image

    def pipeline(self, chunk: list[bytes]) -> tuple[Any, Any]:
        return self.index.search(self.embedder.embed([self.decode(b) for b in chunk]), self.k)

    def reference(self, payloads: list[bytes]) -> list:
        """(scores, ids) of each payload searched alone; also the warm-up of batch 1 and of ``batch``."""
        ref = [self.pipeline([b]) for b in payloads]
        self.pipeline((payloads * (self.batch // len(payloads) + 1))[:self.batch])
        return [(sc[0].tolist(), ids[0].tolist()) for sc, ids in ref]

    def rep(self, payloads: list[bytes], n_batch: int, n_single: int) -> dict:
        """One repetition: ``n_batch`` images in batches (CPU per stage too), then ``n_single`` one at a time."""
        stream = payloads * ((max(n_batch, n_single) // len(payloads)) + 1)
        stages = {"decode": 0.0, "embed": 0.0, "search": 0.0}
        w0, c0 = time.perf_counter(), time.process_time()
        for s in range(0, n_batch, self.batch):
            t0 = time.process_time()
            images = [self.decode(b) for b in stream[s:s + self.batch]]
            t1 = time.process_time()
            emb = self.embedder.embed(images)
            t2 = time.process_time()
            self.index.search(emb, self.k)
            t3 = time.process_time()
            stages["decode"] += t1 - t0
            stages["embed"] += t2 - t1
            stages["search"] += t3 - t2
        b32 = (time.perf_counter() - w0, time.process_time() - c0)
        lat = []
        w0, c0 = time.perf_counter(), time.process_time()
        for s in range(n_single):
            t = time.perf_counter()
            self.pipeline([stream[s]])
            lat.append(time.perf_counter() - t)
        b1 = (time.perf_counter() - w0, time.process_time() - c0)
        return {"b32": b32, "b1": b1, "latencies_s": lat, "stages_s": stages}


def summarise_in_process(reps: list[dict], n_batch: int, n_single: int) -> dict:
    """Batch 32 and batch 1 over the repetitions: the median of images/s and of CPU per image (each on its own);
    latency percentiles over all single-image calls; CPU per stage over all batches."""
    import numpy as np

    def pick(key: str, n: int) -> dict:
        runs = [r[key] for r in reps]
        wall, cpu = float(np.median([w for w, _ in runs])), float(np.median([c for _, c in runs]))
        return {"images": n, "reps": len(runs), "wall_s": wall, "images_per_s": n / wall,
                "cpu_ms_per_image": 1e3 * cpu / n, "all_reps": [{"wall_s": w, "cpu_s": c} for w, c in runs]}

    out = {"batch32": pick("b32", n_batch), "batch1": pick("b1", n_single)}
    out["batch32"]["stage_cpu_ms_per_image"] = {
        key: 1e3 * sum(r["stages_s"][key] for r in reps) / (n_batch * len(reps)) for key in reps[0]["stages_s"]}
    lat = [x for r in reps for x in r["latencies_s"]]
    out["batch1"]["p50_ms"] = float(np.percentile(lat, 50)) * 1e3
    out["batch1"]["p99_ms"] = float(np.percentile(lat, 99)) * 1e3
    return out


def compare(bodies: dict[int, bytes], reference: list | None) -> dict:
    """Served neighbours vs the in-process ones: exact, near-tie reorders (scores within NEAR_TIE), mismatches."""
    res: dict[str, Any] = {"checked": 0, "exact": 0, "near_tie": 0, "mismatch": 0, "examples": []}
    if reference is None:
        return res
    for q, body in sorted(bodies.items()):
        hits = json.loads(body)["results"]
        ids, scores = [h["id"] for h in hits], [h["score"] for h in hits]
        ref_scores, ref_ids = reference[q]
        res["checked"] += 1
        if ids == ref_ids:
            res["exact"] += 1
        elif len(ids) == len(ref_ids) and all(abs(a - b) <= NEAR_TIE for a, b in zip(scores, ref_scores)):
            res["near_tie"] += 1
        else:
            res["mismatch"] += 1
            if len(res["examples"]) < 3:
                res["examples"].append({"query": q, "served": ids[:5], "in_process": ref_ids[:5]})
    return res


# ------------------------------------------------------------------------------------------- report
def fmt(x: Any, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def render(data: dict) -> str:
    from ctxsim.deploy.bench import markdown_table

    m = data["machine"]
    ceil = data["in_process"]
    lines = ["## Serving throughput: `ctxsim serve` on loopback vs the same pipeline in-process", "",
             (f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; {m['os']}; python {m['python']}, "
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, faiss {m['faiss']}. Load average "
             f"{data['load_average_before']} before, {data['load_average_after']} after (other jobs share these "
             f"cores). Date {data['date']}."), "",
             (f"Served: {data['setup']}. Server: {data['server']}. Queries: {data['queries']} distinct gallery images "
             f"(mean {data['query_bytes']['png']:.0f} B as PNG, {data['query_bytes']['jpeg']:.0f} B as JPEG), "
             f"`POST /search` {data.get('body', 'multipart')} with k={data['k']}; load generator: one process, "
             "asyncio, one keep-alive connection per concurrent client."), ""]
    if ceil:
        rows = []
        for f, c in ceil.items():
            st = c["batch32"]["stage_cpu_ms_per_image"]
            rows.append([f.upper(), f"{c['batch32']['cpu_ms_per_image']:.3f}",
                         f"{st['decode']:.3f} / {st['embed']:.3f} / {st['search']:.3f}",
                         f"{c['batch32']['images_per_s']:,.0f}",
                         f"{c['batch1']['cpu_ms_per_image']:.3f}", f"{c['batch1']['images_per_s']:,.0f}",
                         f"{c['batch1']['p50_ms']:.2f}", f"{c['batch1']['p99_ms']:.2f}"])
        lines += [("**Ceiling: the same pipeline in-process** (the server's decode + `Embedder.embed` + "
                  "`Index.search`, same bytes, median of "
                  f"{next(iter(ceil.values()))['batch32']['reps']} repetitions, one before each round of load "
                  "phases while the server idles)"), "",
                  markdown_table(["format", "b=32 CPU ms/img", "of which decode / embed / search", "b=32 img/s",
                                  "b=1 CPU ms/img", "b=1 img/s",
                                  "b=1 p50 ms", "b=1 p99 ms"], rows), ""]
    rows = []
    several = len({r["server"] for r in data["phases"]}) > 1
    for r in data["phases"]:
        ratio = r.get("server_ratio")
        spread = f"{min(r['rps_per_round']):,.0f}-{max(r['rps_per_round']):,.0f}"
        rows.append(([r["server"]] if several else []) + [
                     r["format"].upper(), r["concurrency"], f"{r['rounds']} x {r['requests']}", f"{r['rps']:,.0f}",
                     spread, f"{r['rps_wo_generator']:,.0f}", fmt(r["p50_ms"]), fmt(r["p99_ms"]),
                     fmt(r["server_cpu_ms_per_request"], ".3f"), fmt(ratio), fmt(r["mean_batch"], ".1f"),
                     f"{r['loadgen_cpu_ms_per_request']:.3f}", r["failed"]])
    lines += [("**Served** (each row: one load phase per round, the median over the rounds; server CPU from "
              "/proc/<pid>/stat, batch size from /metrics)"), "",
              markdown_table((["server"] if several else []) + [
                              "format", "concurrency", "requests", "req/s", "req/s range", "req/s w/o generator CPU",
                              "p50 ms",
                              "p99 ms", "server CPU ms/req", "CPU ratio (in-proc b=32 / server)", "mean batch",
                              "generator CPU ms/req", "failed"], rows), ""]
    lines += [("'req/s w/o generator CPU' = requests / (wall - generator CPU / cores): the rate if the load "
              "generator's CPU had been left to the server (it shares the same cores). 'CPU ratio' is the headline: "
              "in-process CPU per image at batch 32 / server CPU per request (1.0: serving adds nothing)."), ""]
    heads = [(f"{r['server']} " if several else "") + f"{r['format'].upper()} c={r['concurrency']} "
             f"{r['server_ratio']:.2f}" for r in data["phases"] if r.get("server_ratio") is not None]
    if heads:
        lines += [(f"**Headline: in-process CPU per image (b=32) / server CPU per request: {', '.join(heads)}** "
                  "(target >= 0.5)."), ""]
    for name, idle in data["idle_server_cpu_ms_per_s"].items():
        if idle is not None:
            lines += [(f"Idle server{f' ({name})' if several else ''}: {idle:.1f} CPU-ms per second (measured over "
                      f"{data['idle_seconds']:.0f} s with no requests)."), ""]
    lines += ["**Targets (issue 15)**", ""]
    lines += [f"- {t['name']}: {t['value']} -> {t['verdict']}" for t in data["targets"]]
    cor = data["correctness"]
    lines += ["", f"Correctness: {cor['checked']} served answers compared with the in-process neighbours: "
                  f"{cor['exact']} identical, {cor['near_tie']} near-tie reorders (scores within {NEAR_TIE:g}), "
                  f"{cor['mismatch']} mismatches." if cor["checked"] else
              "Correctness: not checked (no in-process reference: pass --index)."]
    lines += ["", f"Rerun: `{data['command']}`", ""]
    return "\n".join(lines)


def targets(data: dict) -> list[dict]:
    out = []
    ceil = data["in_process"]
    several = len({r["server"] for r in data["phases"]}) > 1
    for r in data["phases"]:
        c = ceil.get(r["format"]) if ceil else None
        f, conc = (f"{r['server']} " if several else "") + r["format"].upper(), r["concurrency"]
        if c and r["server_cpu_ms_per_request"]:
            ratio = c["batch32"]["cpu_ms_per_image"] / r["server_cpu_ms_per_request"]
            value = f"{ratio:.3f}"
            if conc == 1:
                b1 = c["batch1"]["cpu_ms_per_image"] / r["server_cpu_ms_per_request"]
                value += f" (against in-process batch 1: {b1:.3f})"
            out.append({"name": f"{f} c={conc}: CPU ratio in-process (b=32) / server >= 0.5", "value": value,
                        "verdict": "met" if ratio >= 0.5 else "NOT met"})
        if c and conc == 1 and r["p50_ms"] is not None:
            bound = c["batch1"]["p50_ms"] + 1.0
            out.append({"name": f"{f} c=1: p50 <= in-process single-image p50 + 1 ms",
                        "value": f"{r['p50_ms']:.2f} ms vs {bound:.2f} ms",
                        "verdict": "met" if r["p50_ms"] <= bound else "NOT met"})
        if conc == 32:
            mb = r["mean_batch"]
            out.append({"name": f"{f} c=32: mean batch >= 16", "value": fmt(mb, ".1f"),
                        "verdict": "n/a" if mb is None else ("met" if mb >= 16 else "NOT met")})
            if c:
                share = r["rps"] / c["batch32"]["images_per_s"]
                share_adj = r["rps_wo_generator"] / c["batch32"]["images_per_s"]
                out.append({"name": f"{f} c=32: req/s >= 50% of in-process img/s (b=32)",
                            "value": f"{100 * share:.0f}% as measured, {100 * share_adj:.0f}% with the generator's "
                                     f"CPU ({r['loadgen_cpu_ms_per_request']:.3f} ms/req) removed",
                            "verdict": "met" if share_adj >= 0.5 else "NOT met"})
    return out


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--index", type=Path, help="an existing index folder (default: build one in a temp folder)")
    ap.add_argument("--model", type=Path, help="the model to serve it with (default: the one in index.json)")
    ap.add_argument("--url", help="drive this running server instead of starting one (e.g. http://127.0.0.1:8000)")
    ap.add_argument("--server-pid", type=int, help="with --url: the server's process id, for its CPU time")
    ap.add_argument("--token", default=os.environ.get("CTXSIM_TOKEN"), help="with --url: bearer token, if needed")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    ap.add_argument("--requests", default="200,400,640", help="requests per phase, one per concurrency level")
    ap.add_argument("--formats", default="png,jpeg")
    ap.add_argument("--queries", type=int, default=64, help="distinct query images")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1, help="default set-up: training epochs (0: untrained weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="server and in-process device (cpu, cuda, auto)")
    ap.add_argument("--max-batch", type=int, default=32, help="server --max-batch")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="server --batch-wait-ms")
    ap.add_argument("--precision", default="fp32", help="a run folder served with PyTorch: fp32, bf16, fp16 (CUDA)")
    ap.add_argument("--compile", action="store_true", help="a run folder served with PyTorch: torch.compile")
    ap.add_argument("--body", choices=("multipart", "raw"), default="multipart",
                    help="the upload: multipart (field image, form field k) or raw (Content-Type image/..., ?k=)")
    ap.add_argument("--server-args", default="", help="more `ctxsim serve` options, e.g. '--threads 1'")
    ap.add_argument("--baseline", metavar="PYTHONPATH",
                    help="also start a server whose ctxsim comes from this PYTHONPATH entry (e.g. an older checkout "
                         "laid out as an importable ctxsim package) and measure both, side by side")
    ap.add_argument("--label", default="current", help="name of the server under test in the tables")
    ap.add_argument("--baseline-label", default="baseline", help="name of the --baseline server in the tables")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the in-process ceiling and all load "
                    "phases (median reported)")
    ap.add_argument("--inproc-images", default="1920,300", help="in-process images per round: batch 32, batch 1")
    ap.add_argument("--idle-seconds", type=float, default=3.0, help="idle server CPU measured over this long")
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "serve_throughput.md", help="markdown (and .json beside)")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = ap.parse_args()

    concs = [int(x) for x in args.concurrency.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    if len(counts) != len(concs):
        ap.error("--requests needs one count per --concurrency level")
    formats = [f.strip().lower() for f in args.formats.split(",")]
    if not set(formats) <= {"png", "jpeg"}:
        ap.error("--formats: png and/or jpeg")
    n_batch, n_single = (int(x) for x in args.inproc_images.split(","))

    import numpy as np  # noqa: F401 - fail early if the environment is incomplete

    from ctxsim.deploy.bench import machine_info
    from ctxsim.deploy.embedder import Embedder
    from ctxsim.deploy.index import load_index
    from ctxsim.io import atomic_write_json, atomic_write_text

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="ctxsim-serve-bench-") as td:
        root = Path(td)
        index_dir, model = args.index, args.model
        if index_dir is None and args.url is None:
            index_dir, model = build_default(root, args.epochs, args.seed)
            setup = (f"the omniglot-mini ConvNet (28 px greyscale, 64-d; {args.epochs} training epoch(s), seed "
                     f"{args.seed}) as ONNX, flat index over the 2,960 held-out drawings (28x28 PNG files)")
        else:
            setup = f"index {index_dir}" + (f", model {model}" if model else "")

        index = embedder = None
        if index_dir is not None:
            index = load_index(index_dir)
            model = model or Path(index.info.model)
            embedder = Embedder.from_artifact(model, device=args.device, batch_size=max(64, args.max_batch),
                                              precision=args.precision, compile=args.compile)
            if args.compile:
                embedder.warm_up()
            paths = [it.path for it in index.items]
            setup += f" ({index.info.count} items, {index.info.index_type}, backend {embedder.backend})"
        else:  # --url alone: query with the shipped sample's held-out drawings, no ceiling
            from ctxsim.config import resolve_config
            from ctxsim.data.pipeline import open_eval_dataset

            cfg = resolve_config("omniglot-mini")
            test = open_eval_dataset(cfg, cfg.preprocess)
            qdir = root / "queries"
            qdir.mkdir()
            paths = []
            for i in range(0, len(test), max(1, len(test) // args.queries))[:args.queries]:
                paths.append(str(qdir / f"{i}.png"))
                test.load_image(i).save(paths[-1])
        payloads = encode_queries(paths, args.queries, args.jpeg_quality)

        inproc = InProcess(embedder, index, args.k) if embedder is not None else None
        references = {f: inproc.reference(payloads[f]) for f in formats} if inproc is not None else {}
        inproc_reps: dict[str, list[dict]] = {f: [] for f in formats}

        procs: list[subprocess.Popen] = []
        servers: list[dict] = []  # {"name", "host", "port", "pid"}
        if args.url:
            u = urllib.parse.urlsplit(args.url)
            servers.append({"name": args.label, "host": u.hostname or "127.0.0.1", "port": u.port or 80,
                            "pid": args.server_pid})
            server_desc = f"already running at {args.url}" + ("" if args.server_pid else " (no --server-pid: CPU n/a)")
        else:
            extra = args.server_args.split()
            proc, port = start_server(index_dir, args.model, args, root / "server.log", extra=extra)
            procs.append(proc)
            servers.append({"name": args.label, "host": "127.0.0.1", "port": port, "pid": proc.pid})
            server_desc = (f"`ctxsim serve` (uvicorn, defaults but --device {args.device}, --max-batch "
                           f"{args.max_batch}, --batch-wait-ms {args.batch_wait_ms:g}"
                           + (f", --precision {args.precision}" if args.precision != "fp32" else "")
                           + (", --compile" if args.compile else "") + (f", {args.server_args}" if extra else "") + ")")
        if args.baseline:
            if index_dir is None:
                ap.error("--baseline needs --index or the default set-up (not --url alone)")
            proc, port = start_server(index_dir, args.model, args, root / "baseline.log", pythonpath=args.baseline)
            procs.append(proc)
            servers.append({"name": args.baseline_label, "host": "127.0.0.1", "port": port, "pid": proc.pid})
            server_desc += (f"; side by side with {args.baseline_label}: the same command with "
                            f"PYTHONPATH={args.baseline}")
        try:
            st, info = http_get(servers[0]["host"], servers[0]["port"], "/info", args.token)
            served_info = json.loads(info) if st == 200 else {}
            reqs = {(sv["name"], f): [build_request(sv["host"], sv["port"], b, f, args.k, args.token, args.body)
                                      for b in payloads[f]] for sv in servers for f in formats}
            print("warming up ...", flush=True)
            for sv in servers:
                run_phase(sv["host"], sv["port"], reqs[sv["name"], formats[0]], 4 * max(concs), max(concs), None,
                          args.token)
            idle: dict[str, float | None] = {}
            for sv in servers:
                idle[sv["name"]] = None
                if sv["pid"] is not None and args.idle_seconds > 0:
                    c0 = proc_cpu_s(sv["pid"])
                    time.sleep(args.idle_seconds)
                    c1 = proc_cpu_s(sv["pid"])
                    idle[sv["name"]] = None if c0 is None or c1 is None else 1e3 * (c1 - c0) / args.idle_seconds
            raw = []
            correctness: dict[str, Any] = {"checked": 0, "exact": 0, "near_tie": 0, "mismatch": 0, "examples": []}
            cells = [(f, conc, total) for f in formats for conc, total in zip(concs, counts)]
            for rnd in range(args.rounds):  # round-robin: every cell sees the machine's changing load alike
                if inproc is not None:  # the ceiling too, between the rounds (the servers idle meanwhile)
                    for f in formats:
                        inproc_reps[f].append(inproc.rep(payloads[f], n_batch, n_single))
                        print(f"round {rnd + 1}/{args.rounds} in-process {f.upper()}: "
                              f"{n_batch / inproc_reps[f][-1]['b32'][0]:.0f} img/s at batch 32", flush=True)
                for f, conc, total in cells:
                    order = servers if rnd % 2 == 0 else servers[::-1]  # alternate which server goes first
                    for sv in order:
                        r = run_phase(sv["host"], sv["port"], reqs[sv["name"], f], total, conc, sv["pid"],
                                      args.token)
                        r["server"], r["format"], r["round"] = sv["name"], f, rnd
                        bodies = r.pop("bodies")
                        cmp = compare(dict(bodies.items()), references.get(f))
                        for key in ("checked", "exact", "near_tie", "mismatch"):
                            correctness[key] += cmp[key]
                        correctness["examples"] += [{"server": sv["name"], "format": f, "concurrency": conc, **e}
                                                    for e in cmp["examples"]]
                        r["correctness"] = {k: v for k, v in cmp.items() if k != "examples"}
                        raw.append(r)
                        print(f"round {rnd + 1}/{args.rounds} {sv['name']} {f.upper()} c={conc}: {r['rps']:.0f} "
                              f"req/s, p50 {fmt(r['p50_ms'])} ms, p99 {fmt(r['p99_ms'])} ms, server "
                              f"{fmt(r['server_cpu_ms_per_request'], '.3f')} CPU-ms/req, "
                              f"mean batch {fmt(r['mean_batch'], '.1f')}, generator "
                              f"{r['loadgen_cpu_ms_per_request']:.3f} CPU-ms/req, failed {total - r['ok']}",
                              flush=True)
            phases = [aggregate([r for r in raw if r["server"] == sv["name"] and r["format"] == f
                                 and r["concurrency"] == c])
                      for sv in servers for f in formats for c in concs]
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()

    ceiling = {f: summarise_in_process(reps, n_batch, n_single) for f, reps in inproc_reps.items() if reps}
    data = {"date": args.date, "machine": machine_info(), "load_average_before": load_before,
            "load_average_after": load_average(), "setup": setup, "server": server_desc,
            "served_info": {k: served_info.get(k) for k in ("backend", "fingerprint", "batching", "index")},
            "queries": len(payloads[formats[0]]), "k": args.k, "body": args.body,
            "query_bytes": {f: sum(map(len, payloads[f])) / len(payloads[f]) for f in payloads},
            "in_process": ceiling, "phases": phases, "phases_raw": raw, "rounds": args.rounds,
            "idle_server_cpu_ms_per_s": idle,
            "idle_seconds": args.idle_seconds, "correctness": correctness,
            "command": "python benchmarks/serve_throughput.py " + " ".join(sys.argv[1:])}
    data["command"] = data["command"].strip()
    for r in phases:  # the headline figure of each cell
        c = ceiling.get(r["format"])
        r["server_ratio"] = (c["batch32"]["cpu_ms_per_image"] / r["server_cpu_ms_per_request"]
                             if c and r["server_cpu_ms_per_request"] else None)
    data["targets"] = targets(data)
    text = render(data)
    print(text)
    atomic_write_text(args.out, text)
    atomic_write_json(args.out.with_suffix(".json"), data)
    failed = sum(r["failed"] for r in phases)
    if correctness["mismatch"] or failed:
        sys.exit(f"FAILED: {correctness['mismatch']} answers differ from the in-process neighbours, "
                 f"{failed} requests failed")


if __name__ == "__main__":
    main()
