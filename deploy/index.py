"""Retrieval indexes over L2-normalised embeddings (inner product): FAISS flat / IVF / IVF-PQ / HNSW or exact torch.

Index types (``index_type``):

- ``"flat"``: ``faiss.IndexFlatIP``, exact.
- ``"ivf"``: ``faiss.IndexIVFFlat``; ``nlist`` ~ 4 sqrt(N) clipped so that every list gets >= 39 training points,
  ``nprobe`` = max(8, nlist / 16) (at most nlist).
- ``"ivfpq"``: ``faiss.IndexIVFPQ``; as IVF plus ``m`` sub-quantisers (a divisor of D, D/m >= 4, at most 64) of
  ``nbits`` bits (8 from ~10k images; 4..7 below, where PQ is a poor choice anyway: use flat).
- ``"hnsw"``: ``faiss.IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT``, M = 32, efConstruction = 80, efSearch = 64.
- ``"torch"``: exact search with ``ctxsim.knn`` (torch matmul + top-k, CUDA when available) over the stored
  embeddings; no FAISS needed (the choice for Jetson).

IVF and PQ are trained on the gallery itself at build time. ``gpu=True`` builds and searches flat/IVF/IVF-PQ
indexes on the GPU when FAISS has GPUs (files are always written as CPU indexes).

Index folder (one consistent *generation* n at a time)::

    index.json          model fingerprint, dim, metric "ip", index type and parameters, count, ctxsim version,
                        created/updated, generation n, file names and their sha256
    index.<n>.faiss     the FAISS index (absent for "torch")
    items.<n>.jsonl     the item table: one {"id", "path", "label"} per line, ids 0..count-1
    embeddings.<n>.npy  the float32 [count, D] embeddings (exact re-ranking, recall checks, torch search, rebuilds)

Saves are atomic for the whole folder: the new generation's files are written under new names (temporary file,
fsync, ``os.replace``), then ``index.json`` is replaced last, and only then are superseded files deleted. A crash
at any point leaves the previous ``index.json`` and the files it names (verified by sha256 on load) intact.
Writers take an advisory lock (``.lock``) so that two ``add`` calls cannot interleave.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ctxsim.errors import (ArtifactError, ConfigError, DataError, FingerprintMismatch, MissingDependency,
                           NonFiniteEmbedding)
from ctxsim.io import atomic_path, atomic_write_json, read_json, sha256_file
from ctxsim.schema import check_fields

__all__ = ["INDEX_TYPES", "Item", "IndexInfo", "Index", "build_index", "add_to_index", "load_index",
           "read_index_info", "default_params", "embed_gallery", "check_fingerprint"]

logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw", "torch")
FAISS_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
FORMAT_VERSION = 1
META = "index.json"
_GEN_FILE = re.compile(r"^(index|items|embeddings)\.(\d+)\.(faiss|jsonl|npy)$")
_PQ_M = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)  # sub-quantiser counts FAISS supports everywhere (GPU included)


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Item:
    """One indexed image: its id (row in the index), display path and label (or None)."""

    id: int
    path: str
    label: str | None = None


@dataclass
class IndexInfo:
    """What ``index.json`` records, plus what the last build/add call did (``added``, ``skipped``)."""

    path: str
    index_type: str
    fingerprint: str
    dim: int
    count: int
    params: dict[str, Any] = field(default_factory=dict)
    metric: str = "ip"
    ctxsim_version: str = ""
    created: str = ""
    updated: str = ""
    generation: int = 0
    files: dict[str, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    backend: str | None = None
    format_version: int = FORMAT_VERSION
    added: int = 0                                                           # not saved: this call
    skipped: list[tuple[str, str]] = field(default_factory=list)             # not saved: this call

    _SAVED = ("index_type", "fingerprint", "dim", "count", "params", "metric", "ctxsim_version", "created",
              "updated", "generation", "files", "sha256", "model", "backend", "format_version")

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self._SAVED}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = [list(s) for s in self.skipped]
        return d

    @classmethod
    def from_json(cls, folder: Path, d: Any) -> "IndexInfo":
        """Check ``d`` (index.json's content) field by field: ArtifactError (one line) naming the first problem."""
        where, hint = str(folder / META), "rebuild the index"
        if not isinstance(d, dict):
            raise ArtifactError(f"{where} is not an index description; {hint}")
        for key in ("index_type", "fingerprint", "dim", "count", "files"):
            if key not in d:
                raise ArtifactError(f"{where} lacks {key!r}; {hint}")
        kw = check_fields(cls, {k: d[k] for k in cls._SAVED if k in d}, error=ArtifactError, where=where, hint=hint)
        info = cls(path=str(folder), **kw)
        for name, value, minimum in (("dim", info.dim, 1), ("count", info.count, 0),
                                     ("generation", info.generation, 0)):
            if value < minimum:
                raise ArtifactError(f"{where}: {name} must be >= {minimum}, got {value}; {hint}")
        needed = ("items", "embeddings") if info.index_type == "torch" else ("items", "index")
        for role in needed:
            if role not in info.files:
                raise ArtifactError(f"{where} names no {role} file; {hint}")
        for role, name in info.files.items():
            if Path(name).name != name or name in (".", ".."):
                raise ArtifactError(f"{where}: the {role} file {name!r} is not a file name in the folder; {hint}")
            if not re.fullmatch(r"[0-9a-f]{64}", info.sha256.get(role, "")):
                raise ArtifactError(f"{where} records no sha256 for the {role} file (it could not be verified); "
                                    f"{hint}")
        return info


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- parameters
def default_params(index_type: str, n: int, dim: int) -> dict:
    """Sensible parameters for ``index_type`` over a gallery of ``n`` vectors of dimension ``dim``."""
    if index_type not in INDEX_TYPES:
        raise ConfigError(f"unknown index type {index_type!r}; use one of {', '.join(INDEX_TYPES)}")
    if index_type in ("flat", "torch"):
        return {}
    if index_type == "hnsw":
        return {"M": 32, "efConstruction": 80, "efSearch": 64}
    nlist = int(min(max(round(4 * math.sqrt(n)), 1), max(n // 39, 1), 65536))
    params = {"nlist": nlist, "nprobe": int(min(nlist, max(8, nlist // 16)))}
    if index_type == "ivfpq":
        m = next(m for m in _PQ_M if dim % m == 0 and dim // m >= 4) if dim >= 4 else 1
        # 8 bits once there are >= 39 training points per centroid; never under 4 bits (nor over log2 n)
        nbits = int(min(8, max(4, math.floor(math.log2(max(n, 2) / 39))), math.floor(math.log2(max(n, 2)))))
        params.update({"m": m, "nbits": nbits})
    return params


def _check_params(index_type: str, params: dict, n: int, dim: int) -> dict:
    p = {**default_params(index_type, n, dim), **(params or {})}
    allowed = set(default_params(index_type, 10_000, max(dim, 4)))
    unknown = set(p) - allowed
    if unknown:
        raise ConfigError(f"unknown {index_type} parameter(s) {sorted(unknown)}; known: {sorted(allowed) or 'none'}")
    for k, v in p.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{index_type} parameter {k} must be a positive integer, got {v!r}")
        p[k] = int(v)
    if "nlist" in p and p["nlist"] > n:
        raise ConfigError(f"nlist={p['nlist']} exceeds the gallery size {n}; use a smaller nlist or index type flat")
    if "nprobe" in p:
        p["nprobe"] = min(p["nprobe"], p["nlist"])
    if index_type == "ivfpq":
        if dim % p["m"]:
            raise ConfigError(f"PQ m={p['m']} must divide the embedding dimension {dim}")
        if 2 ** p["nbits"] > n:
            raise ConfigError(f"PQ nbits={p['nbits']} needs at least {2 ** p['nbits']} gallery images to train, "
                              f"got {n}; use a smaller nbits or index type ivf/flat")
    return p


# ---------------------------------------------------------------------------------------------- backends
def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependency("FAISS indexes need faiss: pip install faiss-cpu (aarch64 wheels exist), "
                                "or use index type 'torch'") from None
    return faiss


def _faiss_gpus() -> int:
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _factory_string(index_type: str, p: dict) -> str:
    return {"flat": "Flat", "ivf": f"IVF{p.get('nlist')},Flat",
            "ivfpq": f"IVF{p.get('nlist')},PQ{p.get('m')}x{p.get('nbits')}",
            "hnsw": f"HNSW{p.get('M')},Flat"}[index_type]


def _apply_search_params(index: Any, index_type: str, p: dict) -> None:
    faiss = _faiss()
    if index_type in ("ivf", "ivfpq"):
        try:
            faiss.extract_index_ivf(index).nprobe = p["nprobe"]
        except Exception:  # noqa: BLE001 - GPU IVF: set through the parameter space
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", p["nprobe"])
    elif index_type == "hnsw":
        index.hnsw.efSearch = p["efSearch"]


class _TorchExact:
    """Exact inner-product search with ctxsim.knn's torch searcher (CUDA when available)."""

    def __init__(self, embeddings: np.ndarray, device: str | None = None) -> None:
        import torch

        from ctxsim.knn import ExactSearcher

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._torch = torch
        emb = np.ascontiguousarray(embeddings, np.float32)
        if not emb.flags.writeable:  # memory-mapped: torch wants a writable buffer
            emb = emb.copy()
        self.searcher = ExactSearcher(torch.from_numpy(emb).to(dev), "torch")
        self.ntotal = self.searcher.n

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from ctxsim.knn import auto_chunk_size

        torch = self._torch
        qt = self.searcher.check_queries(torch.from_numpy(q))
        step = auto_chunk_size(self.ntotal, k)
        out_s, out_i = [], []
        with torch.inference_mode():
            for s in range(0, qt.shape[0], step):
                sc, ix = self.searcher.search(qt[s:s + step], k)
                out_s.append(sc.cpu().numpy())
                out_i.append(ix.cpu().numpy())
        return np.concatenate(out_s), np.concatenate(out_i)


def _build_faiss(emb: np.ndarray, index_type: str, p: dict, gpu: bool) -> Any:
    faiss = _faiss()
    d = emb.shape[1]
    if index_type == "flat":
        cpu = faiss.IndexFlatIP(d)
    else:
        cpu = faiss.index_factory(d, _factory_string(index_type, p), faiss.METRIC_INNER_PRODUCT)
    if index_type == "hnsw":
        cpu.hnsw.efConstruction = p["efConstruction"]
    index = cpu
    if gpu and index_type != "hnsw":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    if not index.is_trained:
        index.train(emb)
    index.add(emb)
    _apply_search_params(index, index_type, p)
    return index


def _to_cpu(index: Any) -> Any:
    faiss = _faiss()
    if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith("Gpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


# ---------------------------------------------------------------------------------------------- the Index
class Index:
    """A loaded index: ``search(query_embeddings, k) -> (scores [Q, k], ids [Q, k])``, ``items``, ``info``."""

    def __init__(self, info: IndexInfo, items: list[Item], backend: Any, embeddings: np.ndarray | None = None,
                 embeddings_path: Path | None = None) -> None:
        self.info = info
        self.items = items
        self.backend = backend
        #: the raw FAISS index object (None for index type "torch"); ``Index.search`` calls it directly.
        self.faiss_index = backend if info.index_type in FAISS_TYPES else None
        self._embeddings = embeddings
        self._embeddings_path = embeddings_path

    # -- attributes
    @property
    def index_type(self) -> str:
        return self.info.index_type

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def count(self) -> int:
        return self.info.count

    def __len__(self) -> int:
        return self.info.count

    def __repr__(self) -> str:
        return (f"Index(type={self.index_type!r}, count={self.count}, dim={self.dim}, "
                f"fingerprint={self.fingerprint!r}, path={self.info.path!r})")

    @property
    def embeddings(self) -> np.ndarray:
        """The stored float32 [count, D] embeddings (memory-mapped from the folder when loaded from disk)."""
        if self._embeddings is None:
            if self._embeddings_path is None:
                raise ArtifactError("this index keeps no embeddings; rebuild it")
            self._embeddings = np.load(self._embeddings_path, mmap_mode="r", allow_pickle=False)
        return self._embeddings

    # -- search
    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items of each query by inner product: (scores [Q, k'] float32, ids [Q, k'] int64),
        k' = min(k, count).

        Queries must be float32-convertible [Q, D] (a single [D] vector is taken as Q = 1), L2-normalised.
        """
        q = queries if type(queries) is np.ndarray and queries.dtype == np.float32 else np.asarray(queries, np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.info.dim:
            raise ConfigError(f"queries must have shape [Q, {self.info.dim}], got {tuple(q.shape)}; "
                              "embed them with the index's model")
        if not q.flags.c_contiguous:
            q = np.ascontiguousarray(q)
        if not np.isfinite(q).all():  # FAISS would answer "no neighbours": an error, never an empty result
            raise NonFiniteEmbedding("query embeddings contain NaN or infinite values; the model that embedded "
                                     "them is damaged or overflows (check it with `ctxsim verify`)")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k must be an integer >= 1, got {k!r}")
        return self.backend.search(q, min(int(k), self.info.count))

    def exact_search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` over the stored embeddings (ctxsim.knn), whatever the index type."""
        from ctxsim.knn import knn

        q = np.ascontiguousarray(np.asarray(queries, np.float32))
        return knn(q, np.asarray(self.embeddings, np.float32), min(int(k), self.info.count))

    def check_model(self, fingerprint: str) -> None:
        """Refuse a query model other than the one that built the index (FingerprintMismatch)."""
        check_fingerprint(self.info.fingerprint, fingerprint)

    # -- construction in memory
    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, index_type: str = "flat", params: dict | None = None,
                        gpu: bool = False, fingerprint: str = "", items: Sequence[Item] | None = None) -> "Index":
        """An in-memory index over ``embeddings`` (not saved; used by benchmarks and tests)."""
        emb = _check_embeddings(embeddings)
        n, d = emb.shape
        if index_type not in INDEX_TYPES:
            raise ConfigError(f"unknown index type {index_type!r}; use one of {', '.join(INDEX_TYPES)}")
        p = _check_params(index_type, params or {}, n, d)
        gpu = _want_gpu(gpu, index_type)
        backend = _TorchExact(emb) if index_type == "torch" else _build_faiss(emb, index_type, p, gpu)
        info = IndexInfo(path="", index_type=index_type, fingerprint=fingerprint, dim=d, count=n, params=p)
        its = list(items) if items is not None else [Item(i, f"#{i}", None) for i in range(n)]
        return cls(info, its, backend, emb)


def check_fingerprint(index_fp: str, query_fp: str) -> None:
    """Raise FingerprintMismatch unless the query model is the model that built the index."""
    if index_fp != query_fp:
        raise FingerprintMismatch(f"index built with model {index_fp}, query model {query_fp}: "
                                  "rebuild the index or use the same model")


def _check_embeddings(embeddings: Any) -> np.ndarray:
    emb = np.ascontiguousarray(np.asarray(embeddings), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
        raise ConfigError(f"embeddings must have shape [N, D] with N, D >= 1, got {tuple(emb.shape)}")
    if not np.isfinite(emb).all():
        raise DataError("embeddings contain NaN or infinite values; check the model")
    return emb


def _want_gpu(gpu: bool, index_type: str) -> bool:
    if not gpu:
        return False
    if index_type in ("torch",):
        return False  # the torch index uses CUDA by itself when present
    if _faiss_gpus() < 1:
        raise MissingDependency("gpu=True needs FAISS with GPUs (pip install 'ctxsim[gpu]' on a CUDA machine); "
                                "drop --gpu to build on the CPU")
    if index_type == "hnsw":
        logger.info("FAISS has no GPU HNSW; building hnsw on the CPU")
        return False
    return True


# ---------------------------------------------------------------------------------------------- embedding
def embed_gallery(embedder: Any, gallery: Any, progress: Callable[[int, int], None] | None = None
                  ) -> tuple[np.ndarray, list[Any], list[tuple[str, str]]]:
    """Embed a gallery batch by batch, skipping unreadable images.

    Returns (embeddings [M, D] float32, the M gallery items that were embedded, [(path, reason)] skipped).
    """
    from ctxsim.deploy.gallery import load_images, open_gallery

    g = open_gallery(gallery)
    total = len(g.items)
    bs = max(1, int(getattr(embedder, "batch_size", 64)))
    embs, kept, bad = [], [], []
    for start in range(0, total, bs):
        chunk = g.items[start:start + bs]
        if hasattr(embedder, "embed_files"):  # it decodes (maybe on its device) and skips what it cannot read
            emb, ok, skipped = embedder.embed_files([it.path for it in chunk])
        else:
            images, ok, skipped = load_images([it.path for it in chunk])
            emb = embedder.embed(images) if images else None
        for path, reason in skipped:
            logger.debug("skipping unreadable image %s: %s", path, reason)
        bad.extend(skipped)
        if ok:
            embs.append(emb)
            kept.extend(chunk[i] for i in ok)
        if progress is not None:
            progress(min(start + bs, total), total)
    g.skipped = bad
    if bad:  # one line, however many: the list is in the result's .skipped
        logger.warning("skipped %d unreadable image(s) of %d; first: %s (%s)", len(bad), total, *bad[0])
    if not kept:
        raise DataError(f"no readable images in the gallery ({len(bad)} unreadable, first: "
                        f"{bad[0][0] if bad else '-'}); check the paths")
    return np.concatenate(embs).astype(np.float32, copy=False), kept, bad


def _model_ref(model: Any) -> str | None:
    art = getattr(model, "artifact", model)
    try:
        return str(Path(art).expanduser().resolve())
    except TypeError:
        return None


# ---------------------------------------------------------------------------------------------- folder I/O
@contextlib.contextmanager
def _writer_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        yield
        return
    with open(folder / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_index_info(index_dir: str | os.PathLike) -> IndexInfo:
    """Read ``index.json`` (no hashing, no loading): what ``ctxsim index info`` prints."""
    folder = Path(index_dir)
    if not (folder / META).exists():
        raise ArtifactError(f"{folder} is not an index folder (no {META}); build one with `ctxsim index build`")
    info = IndexInfo.from_json(folder, read_json(folder / META))
    if info.format_version > FORMAT_VERSION:
        raise ArtifactError(f"{folder} was written by a newer ctxsim (index format {info.format_version}); "
                            "upgrade ctxsim")
    if info.metric != "ip":
        raise ArtifactError(f"{folder} uses metric {info.metric!r}; ctxsim indexes use inner product ('ip')")
    return info


def check_files_present(info: IndexInfo) -> None:
    """ArtifactError (one line) when a file that index.json names is missing (no hashing: see ``_verify``)."""
    folder = Path(info.path)
    for role, name in info.files.items():
        if not (folder / name).is_file():
            raise ArtifactError(f"{folder / name} ({role}) named by {META} is missing; restore it or rebuild the index")


def _verify(folder: Path, info: IndexInfo) -> None:
    check_files_present(info)
    for role, name in info.files.items():
        p = folder / name
        want = info.sha256.get(role)
        if want and sha256_file(p) != want:
            raise ArtifactError(f"{p} ({role}) does not match the sha256 in {META} (damaged or replaced); "
                                "rebuild the index")


def _read_items(path: Path) -> list[Item]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                items.append(Item(int(d["id"]), str(d["path"]), d.get("label")))
            except (ValueError, KeyError, TypeError):
                raise ArtifactError(f"{path}:{n}: not an item record; rebuild the index") from None
    return items


def load_index(index_dir: str | os.PathLike, verify: bool = True, gpu: bool = False,
               device: str | None = None) -> Index:
    """Load an index folder (sha256-verified unless ``verify=False``); ``gpu`` moves FAISS flat/IVF to the GPU,
    ``device`` places a "torch" index (default: CUDA when available)."""
    folder = Path(index_dir)
    info = read_index_info(folder)
    if info.index_type not in INDEX_TYPES:
        raise ArtifactError(f"{folder}: unknown index type {info.index_type!r}; rebuild the index")
    if verify:
        _verify(folder, info)
    items = _read_items(folder / info.files["items"])
    if len(items) != info.count:
        raise ArtifactError(f"{folder}: {len(items)} items but {META} says {info.count}; rebuild the index")
    emb_path = folder / info.files["embeddings"] if "embeddings" in info.files else None
    _check_search_params(folder, info)
    if info.index_type == "torch":
        emb = np.load(emb_path, allow_pickle=False)
        if emb.ndim != 2 or emb.shape[1] != info.dim:
            raise ArtifactError(f"{emb_path} holds embeddings of shape {emb.shape}, not [{info.count}, {info.dim}] "
                                f"as {META} says; rebuild the index")
        backend: Any = _TorchExact(emb, device)
        idx = Index(info, items, backend, emb, emb_path)
    else:
        faiss = _faiss()
        try:
            backend = faiss.read_index(str(folder / info.files["index"]))
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"cannot read {folder / info.files['index']} ({e}); rebuild the index") from None
        kind = _FAISS_KINDS.get(type(backend).__name__)
        if kind != info.index_type or backend.d != info.dim:
            raise ArtifactError(f"{folder / info.files['index']} holds a {kind or type(backend).__name__} index of "
                                f"dimension {backend.d}, not {info.index_type} of dimension {info.dim} as {META} "
                                "says; rebuild the index")
        if _want_gpu(gpu, info.index_type):
            backend = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, backend)
        _apply_search_params(backend, info.index_type, info.params)
        # memory-mapped now, so that a later `add` superseding the file does not pull it from under us
        emb = np.load(emb_path, mmap_mode="r", allow_pickle=False) if emb_path is not None else None
        idx = Index(info, items, backend, emb, emb_path)
    if getattr(idx.backend, "ntotal", info.count) != info.count:
        raise ArtifactError(f"{folder}: the index holds {idx.backend.ntotal} vectors but {META} says {info.count}; "
                            "rebuild the index")
    return idx


# what faiss.read_index returns for each index type ctxsim builds
_FAISS_KINDS = {"IndexFlatIP": "flat", "IndexHNSWFlat": "hnsw", "IndexIVFFlat": "ivf", "IndexIVFPQ": "ivfpq"}
_SEARCH_PARAMS = {"ivf": ("nprobe",), "ivfpq": ("nprobe",), "hnsw": ("efSearch",)}


def _check_search_params(folder: Path, info: IndexInfo) -> None:
    for key in _SEARCH_PARAMS.get(info.index_type, ()):
        value = info.params.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArtifactError(f"{folder / META}: params.{key} must be an integer >= 1, got {value!r}; "
                                "rebuild the index")


def _write_items(path: Path, items: Sequence[Item]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"id": it.id, "path": it.path, "label": it.label}, ensure_ascii=False) + "\n")


def _commit(folder: Path, info: IndexInfo, backend: Any, items: Sequence[Item], emb: np.ndarray) -> IndexInfo:
    """Write a new generation of files, then index.json (last), then delete superseded files."""
    gen = info.generation + 1
    files = {"items": f"items.{gen}.jsonl", "embeddings": f"embeddings.{gen}.npy"}
    if info.index_type in FAISS_TYPES:
        files["index"] = f"index.{gen}.faiss"
    hashes = {}
    if "index" in files:
        faiss = _faiss()
        with atomic_path(folder / files["index"]) as tmp:
            faiss.write_index(_to_cpu(backend), str(tmp))
        hashes["index"] = sha256_file(folder / files["index"])
    with atomic_path(folder / files["items"]) as tmp:
        _write_items(tmp, items)
    hashes["items"] = sha256_file(folder / files["items"])
    with atomic_path(folder / files["embeddings"]) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(emb, np.float32), allow_pickle=False)
    hashes["embeddings"] = sha256_file(folder / files["embeddings"])

    from ctxsim import __version__

    info.generation, info.files, info.sha256 = gen, files, hashes
    info.count, info.updated, info.ctxsim_version = len(items), _now(), __version__
    info.created = info.created or info.updated
    atomic_write_json(folder / META, info.to_json())  # the commit point
    keep = set(files.values())
    for p in folder.iterdir():
        if _GEN_FILE.match(p.name) and p.name not in keep:
            with contextlib.suppress(OSError):
                p.unlink()
    return info


# ---------------------------------------------------------------------------------------------- build / add
def build_index(gallery: Any, model_artifact: Any, out_dir: str | os.PathLike, index_type: str = "flat",
                gpu: bool = False, progress: Callable[[int, int], None] | None = None, params: dict | None = None,
                batch_size: int = 64, overwrite: bool = True, device_decode: bool = False) -> IndexInfo:
    """Embed ``gallery`` (folder tree, list file or paths) with ``model_artifact`` and write an index folder.

    ``model_artifact``: a run folder, .onnx, .engine, or an :class:`~ctxsim.deploy.embedder.Embedder`.
    ``device_decode``: decode JPEGs on the model's device (a run folder only; see ``Embedder.embed_files``).
    An existing index in ``out_dir`` is replaced atomically (``overwrite=False`` refuses instead).
    Returns the IndexInfo, with ``skipped`` = [(path, reason)] of the unreadable images.
    """
    from ctxsim.deploy.embedder import as_embedder

    if index_type not in INDEX_TYPES:
        raise ConfigError(f"unknown index type {index_type!r}; use one of {', '.join(INDEX_TYPES)}")
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} exists and is not a folder; pick another output folder")
    if (folder / META).exists() and not overwrite:
        raise ConfigError(f"{folder} already holds an index; use `index add` to extend it or allow overwriting")
    gpu = _want_gpu(gpu, index_type)
    embedder = as_embedder(model_artifact, batch_size, device_decode)
    emb, kept, bad = embed_gallery(embedder, gallery, progress)
    n, d = emb.shape
    p = _check_params(index_type, params or {}, n, d)
    backend = None if index_type == "torch" else _build_faiss(emb, index_type, p, gpu)
    if index_type in ("ivf", "ivfpq"):
        p["trained_on"] = n
    items = [Item(i, it.path, it.label) for i, it in enumerate(kept)]
    with _writer_lock(folder):
        prev_gen = 0
        if (folder / META).exists():
            with contextlib.suppress(Exception):
                prev_gen = int(read_json(folder / META).get("generation", 0))
        info = IndexInfo(path=str(folder), index_type=index_type, fingerprint=embedder.fingerprint, dim=d, count=n,
                         params=p, generation=prev_gen, model=_model_ref(embedder), backend=embedder.backend)
        info = _commit(folder, info, backend, items, emb)
    info.added, info.skipped = n, bad
    logger.info("indexed %d images (%d skipped) into %s (%s)", n, len(bad), folder, index_type)
    return info


def add_to_index(index_dir: str | os.PathLike, images: Any, model_artifact: Any = None,
                 progress: Callable[[int, int], None] | None = None, batch_size: int = 64,
                 device_decode: bool = False) -> IndexInfo:
    """Embed ``images`` (folder tree, list file or paths) and append them; ids continue after the last one.

    The model defaults to the one recorded in index.json; another model is refused (FingerprintMismatch).
    IVF/PQ keep the centroids trained at build time: rebuild when the gallery has grown several times over.
    """
    from ctxsim.deploy.embedder import open_index_model

    folder = Path(index_dir)
    with _writer_lock(folder):
        idx = load_index(folder)
        info = idx.info
        embedder = open_index_model(info, model_artifact, batch_size, device_decode)
        emb_new, kept, bad = embed_gallery(embedder, images, progress)
        if emb_new.shape[1] != info.dim:
            raise ArtifactError(f"the model gives {emb_new.shape[1]}-d embeddings but {folder} holds {info.dim}-d")
        start = info.count
        items = idx.items + [Item(start + i, it.path, it.label) for i, it in enumerate(kept)]
        emb = np.concatenate([np.asarray(idx.embeddings, np.float32), emb_new])
        backend = idx.backend
        if info.index_type in FAISS_TYPES:
            backend.add(emb_new)
        trained = info.params.get("trained_on")
        if trained and len(items) > 4 * trained:
            logger.warning("%s: %d items but the IVF centroids were trained on %d; rebuild for best recall",
                           folder, len(items), trained)
        info = _commit(folder, info, backend, items, emb)
    info.added, info.skipped = len(kept), bad
    return info
