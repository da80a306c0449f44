"""Exact top-k search on the GPU with ctxsim.knn: 1,000,000 x 512 float32 gallery, query batches 1 and 1024,
queries/s against the memory-bandwidth bound (one pass over the gallery per query batch at the measured
device-copy bandwidth).

    python benchmarks/gpu_search.py                  # on CUDA (part of benchmarks/gpu_check.sh)
    python benchmarks/gpu_search.py --dry-run        # CPU, 20,000 x 64: checks the code path

Two ways in: ``ExactSearcher(gallery).search(q, k)`` (gallery validated once, one matmul + top-k per query batch:
what an index does) and ``knn(q, gallery, k)`` (the one-call API: validates the gallery on every call and splits
the queries into chunks under a 256 MiB score budget, returning numpy). The bandwidth bound is
gallery bytes / B with B = bytes read + written per second of a device-to-device copy of the gallery; at batch
1024 the matmul's arithmetic (2*Q*N*D flops, float32, no TF32 unless enabled) is the real limit, shown as TFLOP/s.
Writes gpu_search_<device>.md/.json under benchmarks/results and $OUT.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import calls_for, machine, markdown_table, median, pick, report, set_cpu_threads, timed


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--query-batches", type=int, nargs="+", default=[1, 1024])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dry-run", action="store_true", help="20,000 x 64 gallery, 2 reps")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = pick(a.device)
    set_cpu_threads(device, a.threads)
    cuda = device.type == "cuda"
    if a.dry_run:
        a.n, a.dim, a.reps = 20_000, 64, 2
    from ctxsim.knn import ExactSearcher, knn

    g = torch.Generator(device=device).manual_seed(0)
    gallery = F.normalize(torch.randn(a.n, a.dim, device=device, generator=g), dim=1)
    nbytes = gallery.numel() * gallery.element_size()
    dst = torch.empty_like(gallery)
    copy_s = median([timed(lambda: dst.copy_(gallery), device, 5) for _ in range(3)])
    bandwidth = 2 * nbytes / copy_s  # bytes read + written per second
    dst = None  # free the copy before the search allocates
    bound_s = nbytes / bandwidth      # one read of the gallery

    searcher = ExactSearcher(gallery, backend="torch")
    queries = {q: F.normalize(torch.randn(q, a.dim, device=device, generator=g), dim=1) for q in a.query_batches}
    fns = {}
    for q, x in queries.items():
        fns[("searcher", q)] = (lambda x=x: searcher.search(x, a.k))
        fns[("knn", q)] = (lambda x=x: knn(x, gallery, a.k, backend="torch"))
    calls = {}
    for key, fn in fns.items():  # warm-up, and calls per measurement (~0.3 s each on CUDA)
        fn()
        calls[key] = calls_for(timed(fn, device), 0.3 if cuda else 0.05)
    times: dict = {key: [] for key in fns}
    for _ in range(a.reps):  # interleaved
        for key, fn in fns.items():
            times[key].append(timed(fn, device, calls[key]))

    # sanity: both paths give the same neighbours
    _, i1 = searcher.search(queries[a.query_batches[0]], a.k)
    _, i2 = knn(queries[a.query_batches[0]], gallery, a.k, backend="torch")
    same = bool((i1.cpu().numpy() == i2).all())

    rows, data_rows = [], []
    tf32 = torch.backends.cuda.matmul.allow_tf32 if cuda else False
    for q in a.query_batches:
        t_s, t_k = median(times[("searcher", q)]), median(times[("knn", q)])
        bound_qps = q / bound_s
        tflops = 2 * q * a.n * a.dim / t_s / 1e12
        rows.append([q, f"{q / t_s:,.0f}", f"{q / t_k:,.0f}", f"{bound_qps:,.0f}",
                     f"{100 * (q / t_s) / bound_qps:.1f} %", f"{t_s * 1e3:.3f}", f"{tflops:.1f}"])
        data_rows.append({"query_batch": q, "searcher_qps": q / t_s, "knn_qps": q / t_k,
                          "bandwidth_bound_qps": bound_qps, "searcher_ms": t_s * 1e3, "knn_ms": t_k * 1e3,
                          "tflops": tflops})
    md = "\n".join([
        f"**Exact top-{a.k} search, {a.n:,} x {a.dim} float32 gallery ({nbytes / 1e9:.2f} GB) on {device.type}**", "",
        f"Machine: {machine(device)}. Device copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write) -> one "
        f"gallery pass {bound_s * 1e3:.3f} ms. Median of {a.reps} interleaved repetitions; TF32 "
        f"{'on' if tf32 else 'off'}; searcher and knn() agree: {same}.", "",
        markdown_table(["query batch", "ExactSearcher.search q/s", "knn() q/s", "bandwidth bound q/s",
                        "searcher / bound", "searcher ms per batch", "matmul TFLOP/s"], rows),
    ])
    data = {"device": device.type, "machine": machine(device), "n": a.n, "dim": a.dim, "k": a.k,
            "copy_bandwidth_Bps": bandwidth, "gallery_pass_ms": bound_s * 1e3, "agree": same, "tf32": tf32,
            "rows": data_rows}
    return report("gpu_search", device, md, data, a.out, a.dry_run)


if __name__ == "__main__":
    main()
