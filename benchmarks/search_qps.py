"""Search QPS of ctxsim's ``Index.search`` against calling FAISS directly on the same index object.

100k x 512 random L2-normalised float32 vectors in a flat (exact inner-product) index; query batches of 1 and
1024. The two callers alternate rep by rep (so machine load hits both alike) and the median of each is kept; the
ratio ctxsim / FAISS should be >= 0.95 (the wrapper adds only input checks). Prints a markdown table naming the
machine and writes it to benchmarks/results/search_qps.md (+ .json).

    python benchmarks/search_qps.py [--n 100000] [--dim 512] [--reps 7]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from ctxsim.deploy import Index
from ctxsim.deploy.bench import machine_info, markdown_table
from ctxsim.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def normalised(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--single-queries", type=int, default=20, help="batch-1 queries per repetition")
    ap.add_argument("--out", type=Path, default=RESULTS / "search_qps.md")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    gallery = normalised(rng, args.n, args.dim)
    index = Index.from_embeddings(gallery, "flat")
    raw = index.faiss_index  # the very object Index.search calls
    queries = normalised(rng, 1024, args.dim)
    k = args.k

    def time_batch(fn, q) -> float:
        t0 = time.perf_counter()
        fn(q, k)
        return time.perf_counter() - t0

    def time_singles(fn) -> float:
        t0 = time.perf_counter()
        for i in range(args.single_queries):
            fn(queries[i:i + 1], k)
        return time.perf_counter() - t0

    # same answers first
    s1, i1 = index.search(queries[:64], k)
    s2, i2 = raw.search(queries[:64], k)
    assert np.array_equal(i1, i2) and np.array_equal(s1, s2)

    rows, record = [], {}
    for label, n_q, run in (("1", args.single_queries, time_singles),
                            ("1024", 1024, lambda fn: time_batch(fn, queries))):
        run(index.search), run(raw.search)  # warm-up
        t_ctx, t_faiss = [], []
        for rep in range(args.reps):  # interleaved, alternating which goes first
            pair = [(t_ctx, index.search), (t_faiss, raw.search)]
            for times, fn in (pair if rep % 2 == 0 else pair[::-1]):
                times.append(run(fn))
        q_ctx, q_faiss = n_q / statistics.median(t_ctx), n_q / statistics.median(t_faiss)
        ratio = q_ctx / q_faiss
        paired = statistics.median(f / c for c, f in zip(t_ctx, t_faiss))  # each pair ran back to back
        spread = statistics.pstdev(t_faiss) / statistics.mean(t_faiss)
        record[label] = {"ctxsim_qps": q_ctx, "faiss_qps": q_faiss, "ratio": ratio, "paired_ratio": paired,
                         "faiss_rep_cv": spread, "reps": args.reps, "ctxsim_s": t_ctx, "faiss_s": t_faiss}
        rows.append([label, f"{q_faiss:,.1f}", f"{q_ctx:,.1f}", f"{ratio:.3f}", f"{paired:.3f}",
                     f"{100 * spread:.1f}%", "yes" if min(ratio, paired) >= 0.95 else "no"])

    # the wrapper's own cost, isolated: a 1-vector index makes FAISS itself nearly free
    tiny = Index.from_embeddings(gallery[:1], "flat")
    one = queries[:1]
    calls = 20_000
    over = {}
    for name, fn in (("ctxsim", tiny.search), ("faiss", tiny.faiss_index.search)):
        fn(one, 1)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(one, 1)
        over[name] = (time.perf_counter() - t0) / calls * 1e6
    record["per_call_us"] = over

    m = machine_info()
    import faiss

    threads = faiss.omp_get_max_threads()
    try:
        load = Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        load = "?"
    text = "\n".join([
        f"## Search QPS: ctxsim Index.search vs FAISS direct (flat, {args.n:,} x {args.dim}, k={k})", "",
        f"Machine: {m['cpu']}, {m['cores']} cores (FAISS OpenMP threads: {threads}), load average {load}, "
        f"GPU: {m['gpu'] or 'none'}; "
        f"faiss {m['faiss']}, numpy {np.__version__}. Median of {args.reps} interleaved repetitions; "
        f"batch 1 = {args.single_queries} single-query calls per repetition.", "",
        markdown_table(["query batch", "FAISS direct QPS", "ctxsim QPS", "ratio (medians)", "ratio (paired)",
                        "rep-to-rep spread", ">= 0.95"], rows), "",
        f"Per-call cost on a 1-vector index (Python overhead only): ctxsim {over['ctxsim']:.1f} us, "
        f"FAISS direct {over['faiss']:.1f} us, i.e. ctxsim adds {over['ctxsim'] - over['faiss']:.1f} us per call.",
        ""])
    print(text)
    atomic_write_text(args.out, text)
    atomic_write_json(args.out.with_suffix(".json"), {"machine": m, "n": args.n, "dim": args.dim, "k": k,
                                                     "faiss_threads": threads, "results": record})


if __name__ == "__main__":
    main()
