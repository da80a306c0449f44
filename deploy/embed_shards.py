"""Gallery embeddings as Parquet shards: embedded in-process, or by a Ray Data pipeline on a cluster.

API: ``embed_to_shards``, ``read_embeddings`` (``Embeddings``), ``MANIFEST``. An output folder holds::

    shard-00000.parquet   rows path (string), label (string or null), embedding (list<float32>), in gallery order;
                          the schema metadata "ctxsim" holds the model fingerprint, the shard's item range and
                          the images of that range it could not read
    manifest.json         model fingerprint, dim, counts, the shard list with each file's sha256 and row count,
                          the unreadable images; written last (ctxsim.io atomic write): the folder is complete
                          when manifest.json is

Shard ``i`` covers gallery items ``[i * shard_size, (i + 1) * shard_size)``, so the output does not depend on how
the work was spread. A run resumes: a shard already written by the same model over the same range is kept. With
``ray=None`` the shards are embedded in this process; with ``ray="local"`` (a local Ray) or a cluster address, a
Ray Data pipeline reads the item list, and ``map_batches`` runs one stateful embedder actor per worker (each opens
the model once, decodes and embeds its batches); the driver writes the shards in order (``preserve_order``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from ctxsim.errors import ArtifactError, ConfigError, DataError, FingerprintMismatch, MissingDependency
from ctxsim.io import atomic_path, atomic_write_json, read_json, sha256_file
from ctxsim.schema import check

__all__ = ["MANIFEST", "Embeddings", "embed_to_shards", "read_embeddings"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "ctxsim-embeddings/1"


class ShardEntry(TypedDict):
    file: str
    sha256: str


class _ManifestKeys(TypedDict):
    format: str
    fingerprint: str
    dim: int
    shards: list[ShardEntry]


class EmbeddingsManifest(_ManifestKeys, total=False):
    """``manifest.json`` of an embeddings folder as readers check it (other keys are kept as they are)."""

    skipped: list[tuple[str, str]]
    model: str | None
    backend: str | None
_META_KEY = b"ctxsim"


def _pa() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency("embedding shards need pyarrow: pip install 'ctxsim[ray]' (or pyarrow)") from None
    return pa, pq


@dataclass
class Embeddings:
    """What an embeddings folder holds, read back: rows in gallery order."""

    embeddings: np.ndarray
    items: list[tuple[str, str | None]]
    fingerprint: str
    dim: int
    model: str | None = None
    backend: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def _write_shard(path: Path, paths: Sequence[str], labels: Sequence[str | None], emb: np.ndarray, dim: int,
                 meta: dict[str, Any]) -> None:
    pa, pq = _pa()
    emb = np.ascontiguousarray(emb, np.float32).reshape(len(paths), dim)
    values = pa.array(emb.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (len(paths) + 1) * dim, dim, dtype=np.int32), type=pa.int32())
    table = pa.table({"path": pa.array(list(paths), type=pa.string()),
                      "label": pa.array(list(labels), type=pa.string()),
                      "embedding": pa.ListArray.from_arrays(offsets, values)})
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))


def _shard_meta(path: Path) -> dict[str, Any] | None:
    _, pq = _pa()
    try:
        md = pq.read_schema(str(path)).metadata or {}
        return dict(json.loads(md[_META_KEY]))
    except Exception:  # noqa: BLE001 - a damaged or foreign file is simply not a complete shard: redone
        return None


def _read_shard(path: Path) -> tuple[list[str], list[str | None], np.ndarray]:
    _, pq = _pa()
    t = pq.read_table(str(path))
    col = t.column("embedding").combine_chunks()
    n = t.num_rows
    emb = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32)
    emb = emb.reshape(n, -1) if n else emb.reshape(0, 0)
    return t.column("path").to_pylist(), t.column("label").to_pylist(), emb


# ---------------------------------------------------------------------------------------------- embedding
class _EmbedBatch:
    """Ray Data's stateful map_batches callable: one per worker, opens the model once."""

    def __init__(self, model: str, batch_size: int) -> None:
        from ctxsim.deploy.embedder import Embedder

        self.embedder = Embedder.from_artifact(model, batch_size=batch_size)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        paths = [str(p) for p in batch["path"]]
        emb, ok, bad = self.embedder.embed_files(paths)
        dim = int(self.embedder.dim)
        out = np.zeros((len(paths), dim), np.float32)
        if ok:
            out[np.asarray(ok)] = emb
        # every row not in ``ok`` failed (by position: a path listed twice is two rows); its reason, by path
        why: dict[str, list[str]] = {}
        for path, reason in bad:
            why.setdefault(path, []).append(reason)
        done = set(ok)
        reasons = ["" if i in done else ((why.get(p) or [""]).pop(0) or "unreadable") for i, p in enumerate(paths)]
        return {"idx": np.asarray(batch["idx"]), "embedding": list(out), "error": reasons}


def _paths_digest(items: Any) -> str:
    """sha256 of a shard's image paths: a rerun keeps a shard only when the gallery still lists the same images."""
    return hashlib.sha256("\n".join(it.path for it in items).encode()).hexdigest()


def _in_process(embedder: Any, paths: list[str]) -> Iterator[tuple[int, np.ndarray | None, str]]:
    bs = max(1, int(getattr(embedder, "batch_size", 64)))
    for s in range(0, len(paths), bs):
        chunk = paths[s:s + bs]
        emb, ok, bad = embedder.embed_files(chunk)
        got = dict(zip(ok, emb)) if ok else {}
        why = dict(bad)
        for j, p in enumerate(chunk):
            yield s + j, got.get(j), "" if j in got else (why.get(p) or "unreadable")


def _with_ray(model: str, paths: list[str], address: str, workers: int, batch_size: int, gpus: float = 0.0
              ) -> Iterator[tuple[int, np.ndarray | None, str]]:
    try:
        import ray
    except ImportError:
        raise MissingDependency("--ray needs Ray Data: pip install 'ctxsim[ray]'") from None
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds: Any = ray.data.from_items([{"idx": i, "path": p} for i, p in enumerate(paths)])
    ds = ds.map_batches(_EmbedBatch, fn_constructor_kwargs={"model": model, "batch_size": batch_size},
                        batch_size=batch_size, concurrency=max(1, workers), batch_format="numpy",
                        **({"num_gpus": gpus} if gpus > 0 else {"num_cpus": 1}))
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for i, e, err in zip(batch["idx"], batch["embedding"], batch["error"]):
            yield int(i), (None if err else np.asarray(e, np.float32)), str(err)


def embed_to_shards(gallery: Any, model: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    ray: str | None = None, workers: int = 2, batch_size: int = 64, shard_size: int = 4096,
                    progress: Callable[[int, int], None] | None = None, gpus_per_worker: float = 0.0
                    ) -> dict[str, Any]:
    """Embed ``gallery`` with ``model`` (a run folder, .onnx or .engine) into Parquet shards + manifest.json in
    ``out_dir``; returns the manifest. ``ray``: None (this process), "local" or a Ray cluster address;
    ``gpus_per_worker``: Ray actors on GPUs (Ray sets each one's CUDA_VISIBLE_DEVICES) instead of one CPU each."""
    from ctxsim.deploy.embedder import Embedder
    from ctxsim.deploy.gallery import open_gallery

    if shard_size < 1 or batch_size < 1 or workers < 1:
        raise ConfigError("--shard-size, --batch-size and --workers must be >= 1")
    if gpus_per_worker < 0 or (gpus_per_worker and not ray):
        raise ConfigError("--gpus-per-worker takes a number >= 0, with --ray")
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} exists and is not a folder; pick another output folder")
    folder.mkdir(parents=True, exist_ok=True)
    g = open_gallery(str(gallery) if isinstance(gallery, os.PathLike) else gallery)
    embedder = Embedder.from_artifact(model, batch_size=batch_size)
    fp, dim = embedder.fingerprint, int(embedder.dim)
    n = len(g.items)
    ranges = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    todo = []
    for i, (a, b) in enumerate(ranges):
        meta = _shard_meta(folder / _shard_name(i)) if (folder / _shard_name(i)).exists() else None
        if (meta and meta.get("fingerprint") == fp and meta.get("start") == a and meta.get("stop") == b
                and meta.get("paths_sha256") == _paths_digest(g.items[a:b])):
            continue  # complete from an earlier run over the same images
        todo.append(i)
    if todo:
        paths = [g.items[j].path for i in todo for j in range(*ranges[i])]
        rows = (_with_ray(str(model), paths, ray, workers, batch_size, gpus_per_worker) if ray
                else _in_process(embedder, paths))
        pos = 0
        for i in todo:
            a, b = ranges[i]
            got: list[tuple[str, str | None, np.ndarray]] = []
            bad: list[tuple[str, str]] = []
            for j in range(a, b):
                k, e, err = next(rows)
                if k != pos:
                    raise RuntimeError(f"embedding rows out of order ({k} for {pos})")
                pos += 1
                it = g.items[j]
                if e is None:
                    bad.append((it.path, err))
                else:
                    got.append((it.path, it.label, e))
            emb = np.stack([e for _, _, e in got]) if got else np.zeros((0, dim), np.float32)
            _write_shard(folder / _shard_name(i), [p for p, _, _ in got], [lb for _, lb, _ in got], emb, dim,
                         {"fingerprint": fp, "dim": dim, "start": a, "stop": b, "skipped": bad,
                          "paths_sha256": _paths_digest(g.items[a:b])})
            if progress is not None:
                progress(b, n)
    shards, skipped, count = [], [], 0
    for i, (a, b) in enumerate(ranges):
        p = folder / _shard_name(i)
        meta = _shard_meta(p) or {}
        bad = [tuple(x) for x in meta.get("skipped", [])]
        rows_n = (b - a) - len(bad)
        shards.append({"file": p.name, "start": a, "stop": b, "rows": rows_n, "sha256": sha256_file(p)})
        skipped.extend(bad)
        count += rows_n
    from ctxsim import __version__

    manifest = {"format": FORMAT, "fingerprint": fp, "dim": dim, "model": str(Path(model).expanduser().resolve()),
                "backend": embedder.backend, "gallery_size": n, "count": count, "shard_size": shard_size,
                "skipped": [list(s) for s in skipped], "shards": shards, "ctxsim_version": __version__,
                "ray": ray}
    atomic_write_json(folder / MANIFEST, manifest)
    if skipped:
        logger.warning("skipped %d unreadable image(s) of %d; first: %s (%s)", len(skipped), n, *skipped[0])
    return manifest


# ---------------------------------------------------------------------------------------------- reading
def read_embeddings(folder: str | os.PathLike[str], fingerprint: str | None = None) -> Embeddings:
    """The embeddings of a folder ``embed_to_shards`` completed, every shard checked (sha256, model, dim)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ArtifactError(f"{folder} holds no {MANIFEST} (not an embeddings folder, or `ctxsim embed` did not "
                            "finish; run it again to resume)")
    m = check(read_json(folder / MANIFEST), EmbeddingsManifest, "manifest", error=ArtifactError,
              where=str(folder / MANIFEST), hint="run `ctxsim embed` again")
    if m["format"] != FORMAT or m["dim"] < 1:
        raise ArtifactError(f"{folder / MANIFEST} is not a ctxsim embeddings manifest")
    fp, dim = m["fingerprint"], m["dim"]
    if fingerprint is not None and fingerprint != fp:
        raise FingerprintMismatch(f"embeddings of model {fp}, expected model {fingerprint}: re-embed the gallery")
    embs: list[np.ndarray] = []
    items: list[tuple[str, str | None]] = []
    for s in m["shards"]:
        p = folder / s["file"]
        if Path(s["file"]).name != s["file"] or not p.is_file():
            raise ArtifactError(f"{p} named by {MANIFEST} is missing; run `ctxsim embed` again")
        if sha256_file(p) != s["sha256"]:
            raise ArtifactError(f"{p} does not match the sha256 in {MANIFEST} (replaced or damaged); "
                                "run `ctxsim embed` again")
        meta = _shard_meta(p) or {}
        if meta.get("fingerprint") != fp:
            raise FingerprintMismatch(f"{p} holds embeddings of model {meta.get('fingerprint')}, the manifest "
                                      f"says {fp}: shards of two models cannot make one index")
        paths, labels, emb = _read_shard(p)
        if len(paths) and emb.shape[1] != dim:
            raise ArtifactError(f"{p} holds {emb.shape[1]}-d embeddings, not {dim}-d")
        embs.append(emb.reshape(-1, dim))
        items.extend(zip(paths, labels))
    if not items:
        raise DataError(f"{folder} holds no embeddings (every image was unreadable)")
    skipped = list(m.get("skipped", []))
    return Embeddings(np.concatenate(embs), items, fp, dim, m.get("model"), m.get("backend"), skipped)
