"""Scale-out engines on one box: Milvus Lite vs FAISS flat/HNSW, and Ray Data vs in-process gallery embedding.

Index: the same N x D random L2-normalised float32 vectors (default 100k x 128) in FAISS flat, FAISS HNSW
(ctxsim's defaults: M 32, efConstruction 80, efSearch 64), Milvus Lite FLAT and Milvus Lite HNSW (same M,
efConstruction, ef), each built through ctxsim (``Index.from_embeddings`` / ``build_from_embeddings``). Build time
(Milvus: create + insert + index + load; FAISS: build); QPS at batch 1 (``--single`` queries one by one) and at
batch 256 (``--batched`` queries); recall@10 against FAISS flat (exact) on the batched queries (stored vectors
plus noise, so each query has a real neighbourhood).

Embedding: ``ctxsim embed`` of ``--images`` 28 px greyscale drawings (the shipped Omniglot sample) with the demo-size
ConvNet (untrained: speed does not depend on the weights), in-process and with ``--ray local --workers 2`` (Ray
start-up counted, and reported separately). Writes benchmarks/results/scale.md (+ .json).

    python benchmarks/scale.py [--n 100000] [--dim 128] [--images 2000]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ctxsim.deploy import Index, load_index
from ctxsim.deploy.bench import machine_info, markdown_table
from ctxsim.deploy.index import build_from_embeddings
from ctxsim.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def qps(search, queries: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(queries), batch):
        search(queries[s:s + batch], 10)
    return len(queries) / (time.perf_counter() - t0)


def recall(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(e.tolist())) / exact.shape[1] for a, e in zip(ids, exact)]))


def index_rows(args: argparse.Namespace, tmp: Path) -> list[list]:
    rng = np.random.default_rng(0)
    emb = normalised(rng.standard_normal((args.n, args.dim), dtype=np.float32))
    picks = rng.choice(args.n, args.batched, replace=False)
    queries = normalised(emb[picks] + 0.3 * rng.standard_normal((args.batched, args.dim), dtype=np.float32) /
                         np.sqrt(args.dim))
    exact = Index.from_embeddings(emb, "flat").search(queries, 10)[1]
    items = [(f"img{i}.png", None) for i in range(args.n)]
    rows = []
    for engine, index_type in (("faiss", "flat"), ("faiss", "hnsw"), ("milvus", "flat"), ("milvus", "hnsw")):
        t0 = time.perf_counter()
        if engine == "faiss":
            idx = Index.from_embeddings(emb, index_type)
        else:
            folder = tmp / f"milvus_{index_type}"
            build_from_embeddings(emb, items, "bench", folder, index_type, engine="milvus")
            idx = load_index(folder, verify=False)
        build_s = time.perf_counter() - t0
        q1 = qps(idx.search, queries[:args.single], 1)
        q256 = qps(idx.search, queries, 256)
        r = recall(idx.search(queries, 10)[1], exact)
        name = f"{'Milvus Lite' if engine == 'milvus' else 'FAISS'} {index_type}"
        print(f"{name}: build {build_s:.1f} s, {q1:.0f} q/s at batch 1, {q256:.0f} q/s at batch 256, R@10 {r:.4f}",
              flush=True)
        rows.append([name, f"{build_s:.1f}", f"{q1:.0f}", f"{q256:.0f}", f"{r:.4f}"])
        idx.close()
    return rows


def embed_rows(args: argparse.Namespace, tmp: Path) -> list[list]:
    from ctxsim.data.omniglot import MINI, omniglot
    from ctxsim.data.transforms import Preprocess
    from ctxsim.deploy.embed_shards import embed_to_shards
    from ctxsim.nets import EmbeddingNet, ModelSpec, save_model

    ds = omniglot(MINI, "evaluation")
    gallery = tmp / "gallery"
    gallery.mkdir()
    lines = []
    for i in range(min(args.images, len(ds))):
        p = gallery / f"{i}.png"
        ds.load_image(i).save(p)
        lines.append(str(p))
    (tmp / "list.txt").write_text("\n".join(lines) + "\n")
    run = tmp / "run"
    import torch

    torch.manual_seed(0)
    spec = ModelSpec(backbone="convnet", embedding_dim=64, pooling="avg", in_channels=1, frozen_bn=False)
    save_model(run, EmbeddingNet(spec), Preprocess.greyscale(28, 28))
    rows = []
    for label, ray in (("in-process", None), ("Ray Data, local, 2 workers", "local")):
        extra = ""
        if ray:
            import ray as ray_mod

            t0 = time.perf_counter()
            ray_mod.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            extra = f" (+ {time.perf_counter() - t0:.1f} s Ray start-up, not counted)"
        t0 = time.perf_counter()
        m = embed_to_shards(tmp / "list.txt", run, tmp / ("emb_ray" if ray else "emb_inproc"), ray=ray, workers=2,
                            batch_size=64, shard_size=1024)
        s = time.perf_counter() - t0
        if ray:
            import ray as ray_mod

            ray_mod.shutdown()
        print(f"{label}: {m['count']} images in {s:.1f} s = {m['count'] / s:.0f} images/s{extra}", flush=True)
        rows.append([label + extra, str(m["count"]), f"{s:.1f}", f"{m['count'] / s:.0f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--single", type=int, default=200, help="queries searched one by one")
    ap.add_argument("--batched", type=int, default=2048, help="queries searched 256 at a time (and for recall)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        irows = index_rows(args, tmp)
        erows = [] if args.skip_embed else embed_rows(args, tmp)
    mi = machine_info()
    md = (f"Index: {args.n:,} x {args.dim} float32, k = 10; batch-1 QPS over {args.single} queries, batch-256 QPS "
          f"and recall@10 (vs FAISS flat) over {args.batched}.\n\n"
          + markdown_table(["engine", "build s", "QPS batch 1", "QPS batch 256", "recall@10"], irows)
          + ("\n\nEmbedding (`ctxsim embed`, demo ConvNet, 28 px):\n\n"
             + markdown_table(["how", "images", "s", "images/s"], erows) if erows else "")
          + f"\n\nMachine: {mi['cpu']}, {mi['cores']} cores; Python {mi['python']}.\n")
    print(md)
    atomic_write_text(args.out, md)
    atomic_write_json(args.out.with_suffix(".json"), {"index": irows, "embed": erows, "machine": mi,
                                                      "args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
