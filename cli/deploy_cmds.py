"""`ctxsim index build/add/info`, `ctxsim embed`, `ctxsim search`, `ctxsim serve`, `ctxsim bench`: thin commands
over ctxsim.deploy."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ctxsim.cli.console import console, err_console, progress_callback

THREADS_HELP = ("Threads for PyTorch, ONNX Runtime and FAISS together (default: CTXSIM_THREADS, else the usable "
                "cores; docs/ARCHITECTURE.md, 'Threads').")


def _threads(threads: int | None) -> None:
    """Apply the thread policy (ctxsim.deploy.threads) before the command opens a model."""
    if threads is not None:
        from ctxsim.deploy.threads import set_threads

        set_threads(threads)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _print_skipped(skipped: list) -> None:
    if skipped:
        err_console.print(f"[yellow]unreadable, not indexed ({len(skipped)}):[/yellow]")
        for path, reason in skipped[:20]:
            err_console.print(f"  {path}: {reason}", highlight=False)
        if len(skipped) > 20:
            err_console.print(f"  ... and {len(skipped) - 20} more")


def _info_table(info) -> Table:
    t = Table(title=f"index {info.path}", show_header=False)
    for k in ("index_type", "count", "dim", "metric", "fingerprint", "params", "model", "backend", "generation",
              "created", "updated", "ctxsim_version", "engine", "milvus"):
        v = getattr(info, k)
        if k in ("engine", "milvus") and v is None:
            continue
        t.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    return t


def register(app: typer.Typer) -> None:
    """Add `index` (build/add/info), `search`, `serve` and `bench` to ``app``."""
    index_app = typer.Typer(no_args_is_help=True, help="Build, extend and inspect retrieval indexes.")
    app.add_typer(index_app, name="index")

    @index_app.command("build", epilog="Example: ctxsim index build gallery/ --model runs/omni --out idx --type hnsw  "
                                       "(Milvus Lite: add --backend milvus; a server: --uri http://host:19530)")
    def index_build(
        gallery: Path | None = typer.Argument(None, help="Class-per-folder tree or list file ('path [label]' lines); "
                                              "omit with --from-embeddings."),
        model: Path | None = typer.Option(None, help="Run folder, .onnx or .engine."),
        out: Path = typer.Option(..., help="Index folder to write."),
        type_: str = typer.Option("flat", "--type", help="flat, ivf, ivfpq, hnsw or torch (exact, no FAISS); "
                                                         "Milvus: flat, hnsw or ivf_flat."),
        backend: str = typer.Option("faiss", help="Index engine: faiss, or milvus (pip install 'ctxsim[milvus]')."),
        uri: str | None = typer.Option(None, help="Milvus: a Lite database file (default: milvus.db in OUT) or a "
                                                  "server, http://host:19530."),
        collection: str | None = typer.Option(None, help="Milvus collection name (default: ctxsim)."),
        from_embeddings: Path | None = typer.Option(None, help="Build from `ctxsim embed` shards (no embedding; "
                                                    "the model's fingerprint comes with them)."),
        param: list[str] = typer.Option([], help="Index parameter, e.g. --param nlist=256 (repeatable)."),
        gpu: bool = typer.Option(False, "--gpu", help="Build/search flat/IVF indexes on the GPU (FAISS with GPUs)."),
        batch_size: int = typer.Option(64, help="Images per embedding batch."),
        device_decode: bool = typer.Option(False, "--device-decode",
                                           help="Decode JPEGs on the model's device (nvJPEG on a GPU; run folders)."),
        force: bool = typer.Option(False, "--force", help="Replace an index already in OUT."),
        threads: int | None = typer.Option(None, help=THREADS_HELP),
    ) -> None:
        """Embed a gallery and write an index folder (unreadable images are reported and skipped)."""
        from ctxsim.deploy.index import build_from_embeddings, build_index
        from ctxsim.errors import ConfigError

        params = {}
        for p in param:
            k, sep, v = p.partition("=")
            if not sep or not v.strip().isdigit():
                raise ConfigError(f"--param takes name=integer, got {p!r}")
            params[k.strip()] = int(v)
        _threads(threads)
        if from_embeddings is not None:
            if gallery is not None or model is not None:
                raise ConfigError("--from-embeddings takes the place of GALLERY and --model; give one or the other")
            from ctxsim.deploy.embed_shards import read_embeddings

            shards = read_embeddings(from_embeddings)
            info = build_from_embeddings(shards.embeddings, shards.items, shards.fingerprint, out, type_, gpu=gpu,
                                         params=params, overwrite=force, engine=backend, uri=uri,
                                         collection=collection, model=shards.model, model_backend=shards.backend,
                                         skipped=shards.skipped)
            console.print(_info_table(info))
            return
        if gallery is None or model is None:
            raise ConfigError("give GALLERY and --model (or --from-embeddings DIR)")
        with progress_callback("embedding gallery") as progress:
            info = build_index(gallery, model, out, type_, gpu=gpu, progress=progress, params=params,
                               batch_size=batch_size, overwrite=force, device_decode=device_decode, engine=backend,
                               uri=uri, collection=collection)
        _print_skipped(info.skipped)
        console.print(_info_table(info))

    @index_app.command("add", epilog="Example: ctxsim index add idx new_images/")
    def index_add(
        index_dir: Path = typer.Argument(..., help="An index folder."),
        images: Path = typer.Argument(..., help="Class-per-folder tree or list file of images to append."),
        model: Path | None = typer.Option(None, help="Query model (default: the one in index.json)."),
        batch_size: int = typer.Option(64, help="Images per embedding batch."),
        device_decode: bool = typer.Option(False, "--device-decode",
                                           help="Decode JPEGs on the model's device (nvJPEG on a GPU; run folders)."),
    ) -> None:
        """Append images to an index; ids continue after the last one. The save is atomic."""
        from ctxsim.deploy.index import add_to_index

        with progress_callback("embedding") as progress:
            info = add_to_index(index_dir, images, model, progress=progress, batch_size=batch_size,
                                device_decode=device_decode)
        _print_skipped(info.skipped)
        console.print(f"added {info.added} image(s); the index now holds {info.count}")

    @index_app.command("info", epilog="Example: ctxsim index info idx --check-recall 10")
    def index_info(
        index_dir: Path = typer.Argument(..., help="An index folder."),
        check_recall: int | None = typer.Option(None, help="Also measure recall@K against exact search."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Show index.json (and optionally the index's recall@K against exact search)."""
        from ctxsim.deploy.index import check_files_present, load_index, read_index_info
        from ctxsim.deploy.search import check_recall as recall

        info = read_index_info(index_dir)
        check_files_present(info)
        out = info.to_json()
        if check_recall:
            out["recall"] = recall(load_index(index_dir), k=check_recall)
        if json_out:
            console.print_json(json.dumps(out))
            return
        console.print(_info_table(info))
        if check_recall:
            r = out["recall"]
            console.print(f"recall@{r['k']} vs exact search: {r['recall']:.4f} ({r['queries']} queries)")

    @app.command("embed", epilog="Example: ctxsim embed gallery/ --model runs/omni --out emb --ray local --workers 2  "
                                 "(then: ctxsim index build --from-embeddings emb --out idx)")
    def embed_cmd(
        gallery: Path = typer.Argument(..., help="Class-per-folder tree or list file ('path [label]' lines)."),
        model: Path = typer.Option(..., help="Run folder, .onnx or .engine."),
        out: Path = typer.Option(..., help="Folder of Parquet shards + manifest.json to write (or resume)."),
        ray: str | None = typer.Option(None, "--ray", help="Embed with Ray Data: 'local' (a Ray on this machine) or "
                                       "a cluster address (ray://host:10001, auto); default: in this process."),
        workers: int = typer.Option(2, help="Ray: embedder actors (one model each)."),
        gpus_per_worker: float = typer.Option(0.0, help="Ray: GPUs per actor (e.g. 1, or 0.5 to share one); "
                                              "default: one CPU each."),
        batch_size: int = typer.Option(64, help="Images per embedding batch."),
        shard_size: int = typer.Option(4096, help="Images per Parquet shard."),
        threads: int | None = typer.Option(None, help=THREADS_HELP),
    ) -> None:
        """Embed a gallery into Parquet shards (path, label, embedding) and a manifest (model fingerprint, shard
        sha256s); a rerun keeps the complete shards. Unreadable images are listed and skipped."""
        from ctxsim.deploy.embed_shards import embed_to_shards

        _threads(threads)
        with progress_callback("embedding gallery") as progress:
            m = embed_to_shards(gallery, model, out, ray=ray, workers=workers, batch_size=batch_size,
                                shard_size=shard_size, progress=progress, gpus_per_worker=gpus_per_worker)
        _print_skipped([tuple(s) for s in m["skipped"]])
        console.print(f"embedded {m['count']} of {m['gallery_size']} image(s) into {len(m['shards'])} shard(s) "
                      f"in {out} (model {m['fingerprint']}, dim {m['dim']})")

    @app.command("search", epilog="Example: ctxsim search idx query.jpg -k 5 --grid results.png")
    def search_cmd(
        index_dir: Path = typer.Argument(..., help="An index folder."),
        queries: list[Path] = typer.Argument(None, help="Query images, or one folder tree / list file."),
        k: int = typer.Option(10, "-k", "--k", help="Neighbours per query."),
        model: Path | None = typer.Option(None, help="Query model (default: the one in index.json)."),
        grid: Path | None = typer.Option(None, help="Also draw the results into this PNG."),
        thumb: int = typer.Option(96, help="Thumbnail size of the grid (px)."),
        check_recall: bool = typer.Option(False, "--check-recall", help="Report recall@k against exact search."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
        threads: int | None = typer.Option(None, help=THREADS_HELP),
    ) -> None:
        """Search an index with query images (the index's model is used; another model is refused)."""
        from ctxsim.deploy.index import load_index
        from ctxsim.deploy.search import check_recall as recall
        from ctxsim.deploy.search import search, write_grid
        from ctxsim.errors import ConfigError

        if not queries and not check_recall:
            raise ConfigError("give query images (or a folder / list file), or --check-recall")
        _threads(threads)
        index = load_index(index_dir)
        results = []
        if queries:
            src = str(queries[0]) if len(queries) == 1 and (queries[0].is_dir() or
                                                             queries[0].suffix in (".txt", ".csv", ".lst")) \
                else [str(q) for q in queries]
            results = search(index, src, k=k, model=model)
        rec = recall(index, k=k) if check_recall else None
        if json_out:
            console.print_json(json.dumps({"results": [r.to_dict() for r in results], "recall": rec}))
        else:
            for r in results:
                t = Table(title=f"{r.query}" + (f"  [{r.label}]" if r.label else ""))
                for col in ("rank", "score", "id", "label", "path"):
                    t.add_column(col, justify="right" if col in ("rank", "score", "id") else "left")
                for n in r.neighbors:
                    t.add_row(str(n.rank), f"{n.score:.4f}", str(n.id), str(n.label or "-"), n.path)
                console.print(t)
            if rec:
                console.print(f"recall@{rec['k']} of the {rec['index_type']} index vs exact search: "
                              f"{rec['recall']:.4f} ({rec['queries']} stored vectors as queries)")
        if grid and results:
            w, h = write_grid(results, grid, thumb=thumb)
            console.print(f"grid: {grid} ({w}x{h})")

    @app.command("serve", epilog="Example: ctxsim serve idx --port 8000 --token-file /run/secrets/ctxsim_token "
                                 "(or export CTXSIM_TOKEN=...)")
    def serve_cmd(
        index_dir: Path = typer.Argument(..., help="An index folder."),
        model: Path | None = typer.Option(None, help="Model (default: the one in index.json)."),
        host: str = typer.Option("127.0.0.1", help="Interface to listen on (loopback by default)."),
        port: int = typer.Option(8000, help="TCP port."),
        token: str | None = typer.Option(None, envvar="CTXSIM_TOKEN", help="Require 'Authorization: Bearer TOKEN' "
                                         "(prefer --token-file or CTXSIM_TOKEN: a --token value shows in the "
                                         "process list)."),
        token_file: Path | None = typer.Option(None, help="Read the required bearer token from this file."),
        max_upload_mb: float = typer.Option(10.0, help="Largest accepted upload (MB)."),
        max_pixels: int = typer.Option(40_000_000, help="Largest accepted image (pixels)."),
        max_batch: int = typer.Option(32, help="Largest dynamic batch."),
        batch_wait_ms: float = typer.Option(5.0, help="How long to collect a batch (ms)."),
        device: str = typer.Option("auto", help="auto, cpu or cuda."),
        reload_every: float = typer.Option(2.0, help="Seconds between checks for a new index generation "
                                                     "(`index add`, a rebuild); 0: never reload."),
        precision: str = typer.Option("fp32", help="PyTorch models: fp32, bf16, or fp16 (CUDA)."),
        compile: bool = typer.Option(False, "--compile", help="PyTorch models: torch.compile (max-autotune and CUDA "
                                                              "graphs on a GPU; minutes of tuning at start)."),
        follow_model: bool = typer.Option(False, "--follow-model", help="An index generation built with another "
                                          "model (retrained, re-indexed) brings that model along instead of being "
                                          "refused."),
        threads: int | None = typer.Option(None, help="Compute threads for PyTorch, ONNX Runtime and FAISS "
                                           "together (default: CTXSIM_THREADS, else the usable cores less one, "
                                           "kept for the event loop; pools sleep between batches, no spin-waiting; "
                                           "docs/ARCHITECTURE.md, 'Threads')."),
        access_log: bool = typer.Option(False, "--access-log", help="Log a line per request (off by default: on a "
                                        "small model it costs more CPU than the inference)."),
    ) -> None:
        """Serve search/embed over HTTP (POST /search, POST /embed, GET /healthz, GET /info, GET /metrics) and a
        search page at http://HOST:PORT/ (drop an image, see the top-k, click one for more like it; it asks for the
        token, if any); picks up what `ctxsim index add` writes without a restart."""
        import logging
        import os

        # before PyTorch and FAISS load their OpenMP runtimes: idle OpenMP threads sleep instead of spinning against
        # the event loop (ctxsim.deploy.threads)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from ctxsim.cli.console import show_logs
        from ctxsim.deploy.serve import read_token_file, serve
        from ctxsim.errors import ConfigError

        if token_file is not None:
            if token:
                raise ConfigError("give the token once: --token-file, or --token / CTXSIM_TOKEN")
            token = read_token_file(token_file)
        show_logs(logging.INFO)  # a long-running server says when it reloads the index
        console.print(f"serving {index_dir} on http://{host}:{port} (search page: http://{host}:{port}/)"
                      + (" (token required)" if token else ""))
        serve(index_dir, host=host, port=port, token=token, model=model,
              max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels, max_batch=max_batch,
              batch_wait_ms=batch_wait_ms, device=device, reload_every_s=reload_every, precision=precision,
              compile=compile, follow_model=follow_model, threads=threads, access_log=access_log)

    @app.command("bench", epilog="Example: ctxsim bench runs/omni --limit 2000")
    def bench_cmd(
        run_dir: Path = typer.Argument(..., help="A run folder (its export/ folder is used when present)."),
        backends: str = typer.Option("torch,onnx,tensorrt", help="Comma-separated backends."),
        precisions: str = typer.Option("fp32,fp16", help="Comma-separated: fp32, fp16, int8 (ONNX int8 is "
                                                          "quantised when the export folder has none)."),
        batches: str = typer.Option("1,32", help="Batch sizes; latency at 1, throughput at the largest."),
        index_types: str = typer.Option("flat,ivf,ivfpq,hnsw,torch", help="Index types to measure."),
        limit: int | None = typer.Option(None, help="At most this many evaluation images."),
        data: str | None = typer.Option(None, help="Dataset root, if it moved since training."),
        out: Path | None = typer.Option(None, help="Where bench.json/bench.md go (default RUN_DIR/bench)."),
        device: str = typer.Option("auto", help="auto, cpu or cuda."),
        threads: int | None = typer.Option(None, help=THREADS_HELP),
    ) -> None:
        """One table for this machine: backend x precision (size, latency, throughput, R@1, ΔR@1), index QPS/recall."""
        from ctxsim.deploy.bench import bench
        from ctxsim.errors import ConfigError

        try:
            bs = tuple(int(b) for b in _csv(batches))
        except ValueError:
            raise ConfigError(f"--batches takes comma-separated integers, got {batches!r}") from None
        _threads(threads)
        with console.status("benchmarking") as status:
            report = bench(run_dir, backends=tuple(_csv(backends)), batches=bs,
                           index_types=tuple(_csv(index_types)), limit=limit, precisions=tuple(_csv(precisions)),
                           data_root=data, out_dir=out, device=device, progress=lambda m: status.update(m))
        console.print(report.to_markdown(), highlight=False, markup=False)
        console.print(f"wrote {(out or run_dir / 'bench') / 'bench.json'} and bench.md")
