"""Index engines behind one interface, chosen by index type: FAISS and exact torch search (inner product).

API: ``IndexEngine`` (build, save, load) and ``IndexBackend`` (add, search, ntotal), the Protocols an engine
implements; ``engine_for(index_type)``; ``INDEX_TYPES``, ``default_params``, ``check_params``, ``want_gpu``.
Index types: ``"flat"`` (``IndexFlatIP``, exact); ``"ivf"`` (``IndexIVFFlat``, nlist ~ 4 sqrt(N) with >= 39
training points a list, nprobe = max(8, nlist / 16)); ``"ivfpq"`` (as ivf plus ``m`` sub-quantisers, a divisor
of D with D/m >= 4, of ``nbits`` bits: 8 from ~10k images, 4..7 below); ``"hnsw"`` (``IndexHNSWFlat``, M = 32,
efConstruction = 80, efSearch = 64); ``"torch"`` (``ctxsim.knn`` over the stored embeddings, CUDA when
available, no FAISS: the choice for Jetson). IVF and PQ train on the gallery at build time; ``gpu`` builds and
searches flat/IVF/IVF-PQ on the GPU where FAISS has GPUs (files are always written as CPU indexes).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from ctxsim.deploy.index_store import META, IndexInfo
from ctxsim.errors import ArtifactError, ConfigError, DataError, MissingDependency

__all__ = ["FAISS_TYPES", "INDEX_TYPES", "FaissEngine", "IndexBackend", "IndexEngine", "TorchEngine",
           "TorchExact", "check_embeddings", "check_index_type", "check_params", "default_params", "engine_for",
           "read_embeddings", "want_gpu"]

logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw", "torch")
FAISS_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
_PQ_M = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)  # sub-quantiser counts FAISS supports everywhere (GPU included)


class IndexBackend(Protocol):
    """An index in memory. FAISS's own index objects are backends as they are: ``Index.search`` calls them
    directly, with no wrapper in between."""

    @property
    def ntotal(self) -> int: ...

    def add(self, embeddings: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class IndexEngine(Protocol):
    """One index engine: builds backends of its index types, saves them to the generation's index file and loads
    them back. ``own_file``: whether it has such a file (the torch engine searches the stored embeddings).
    ``gpu`` asks for the GPU (see :func:`want_gpu`); ``device`` places an engine that picks its own."""

    index_types: ClassVar[tuple[str, ...]]
    own_file: ClassVar[bool]

    def build(self, embeddings: np.ndarray, index_type: str, params: dict[str, int], gpu: bool = False,
              device: str | None = None) -> IndexBackend: ...

    def save(self, backend: IndexBackend, path: Path) -> None: ...

    def load(self, folder: Path, info: IndexInfo, gpu: bool = False, device: str | None = None) -> IndexBackend: ...


# ---------------------------------------------------------------------------------------------- parameters
def check_index_type(index_type: str) -> None:
    """ConfigError unless ``index_type`` is one of :data:`INDEX_TYPES`."""
    if index_type not in INDEX_TYPES:
        raise ConfigError(f"unknown index type {index_type!r}; use one of {', '.join(INDEX_TYPES)}")


def default_params(index_type: str, n: int, dim: int) -> dict[str, int]:
    """Sensible parameters for ``index_type`` over a gallery of ``n`` vectors of dimension ``dim``."""
    check_index_type(index_type)
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


def check_params(index_type: str, params: dict[str, Any] | None, n: int, dim: int) -> dict[str, int]:
    """``params`` over the defaults, checked against a gallery of ``n`` vectors of dimension ``dim``."""
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


def check_embeddings(embeddings: Any) -> np.ndarray:
    """``embeddings`` as a contiguous float32 [N, D] array (N, D >= 1, finite), else ConfigError / DataError."""
    emb = np.ascontiguousarray(np.asarray(embeddings), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
        raise ConfigError(f"embeddings must have shape [N, D] with N, D >= 1, got {tuple(emb.shape)}")
    if not np.isfinite(emb).all():
        raise DataError("embeddings contain NaN or infinite values; check the model")
    return emb


def read_embeddings(path: Path, mmap: bool = False) -> np.ndarray:
    """An index folder's stored embeddings (``.npy``; memory-mapped with ``mmap``); a file numpy cannot read (truncated,
    not an array, pickled objects) is a one-line ArtifactError, as an unreadable FAISS file is."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ArtifactError(f"cannot read {path} ({e}); rebuild the index") from None


def want_gpu(gpu: bool, index_type: str) -> bool:
    """Whether to build/search ``index_type`` on a GPU when ``gpu`` asks for it (MissingDependency: FAISS has none)."""
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


# ---------------------------------------------------------------------------------------------- FAISS
def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise MissingDependency("FAISS indexes need faiss: pip install faiss-cpu (aarch64 wheels exist), "
                                "or use index type 'torch'") from None
    return faiss


def _faiss_gpus() -> int:
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


# what faiss.read_index returns for each index type ctxsim builds
_FAISS_KINDS = {"IndexFlatIP": "flat", "IndexHNSWFlat": "hnsw", "IndexIVFFlat": "ivf", "IndexIVFPQ": "ivfpq"}
_SEARCH_PARAMS = {"ivf": ("nprobe",), "ivfpq": ("nprobe",), "hnsw": ("efSearch",)}


class FaissEngine:
    """FAISS flat / IVF / IVF-PQ / HNSW; the backends are FAISS's own index objects."""

    index_types: ClassVar[tuple[str, ...]] = FAISS_TYPES
    own_file: ClassVar[bool] = True

    def build(self, embeddings: np.ndarray, index_type: str, params: dict[str, int], gpu: bool = False,
              device: str | None = None) -> IndexBackend:
        faiss = _faiss()
        gpu = want_gpu(gpu, index_type)
        d = embeddings.shape[1]
        if index_type == "flat":
            cpu = faiss.IndexFlatIP(d)
        else:
            cpu = faiss.index_factory(d, _factory_string(index_type, params), faiss.METRIC_INNER_PRODUCT)
        if index_type == "hnsw":
            cpu.hnsw.efConstruction = params["efConstruction"]
        index = cpu
        if gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
        if not index.is_trained:
            index.train(embeddings)
        index.add(embeddings)
        _apply_search_params(index, index_type, params)
        return index

    def save(self, backend: IndexBackend, path: Path) -> None:
        faiss = _faiss()
        faiss.write_index(_to_cpu(backend), str(path))

    def load(self, folder: Path, info: IndexInfo, gpu: bool = False, device: str | None = None) -> IndexBackend:
        """The index file ``info`` names, checked to be of its kind and dimension; on the GPU when ``gpu``."""
        for key in _SEARCH_PARAMS.get(info.index_type, ()):
            value = info.params.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArtifactError(f"{folder / META}: params.{key} must be an integer >= 1, got {value!r}; "
                                    "rebuild the index")
        faiss = _faiss()
        path = folder / info.files["index"]
        try:
            backend = faiss.read_index(str(path))
        except Exception as e:  # noqa: BLE001 - FAISS raises RuntimeError for any damaged or foreign file
            raise ArtifactError(f"cannot read {path} ({e}); rebuild the index") from None
        kind = _FAISS_KINDS.get(type(backend).__name__)
        if kind != info.index_type or backend.d != info.dim:
            raise ArtifactError(f"{path} holds a {kind or type(backend).__name__} index of dimension {backend.d}, "
                                f"not {info.index_type} of dimension {info.dim} as {META} says; rebuild the index")
        if want_gpu(gpu, info.index_type):
            backend = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, backend)
        _apply_search_params(backend, info.index_type, info.params)
        return backend


def _factory_string(index_type: str, p: dict[str, int]) -> str:
    return {"flat": "Flat", "ivf": f"IVF{p.get('nlist')},Flat",
            "ivfpq": f"IVF{p.get('nlist')},PQ{p.get('m')}x{p.get('nbits')}",
            "hnsw": f"HNSW{p.get('M')},Flat"}[index_type]


def _apply_search_params(index: Any, index_type: str, p: dict[str, Any]) -> None:
    faiss = _faiss()
    if index_type in ("ivf", "ivfpq"):
        try:
            faiss.extract_index_ivf(index).nprobe = p["nprobe"]
        except Exception:  # noqa: BLE001 - GPU IVF: set through the parameter space
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", p["nprobe"])
    elif index_type == "hnsw":
        index.hnsw.efSearch = p["efSearch"]


def _to_cpu(index: Any) -> Any:
    faiss = _faiss()
    if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith("Gpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


# ---------------------------------------------------------------------------------------------- torch
class TorchExact:
    """Exact inner-product search with ctxsim.knn's torch searcher (CUDA when available) over ``embeddings``."""

    def __init__(self, embeddings: np.ndarray, device: str | None = None) -> None:
        import torch

        self._torch = torch
        self._device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._set(embeddings)

    def _set(self, embeddings: np.ndarray) -> None:
        from ctxsim.knn import ExactSearcher

        emb = np.ascontiguousarray(embeddings, np.float32)
        #: the float32 [N, D] array searched (the very array a loaded index keeps as its stored embeddings)
        self.embeddings = emb
        if not emb.flags.writeable:  # memory-mapped: torch wants a writable buffer
            emb = emb.copy()
        self.searcher = ExactSearcher(self._torch.from_numpy(emb).to(self._device), "torch")

    @property
    def ntotal(self) -> int:
        return int(self.searcher.n)

    def add(self, embeddings: np.ndarray) -> None:
        self._set(np.concatenate([self.embeddings, np.asarray(embeddings, np.float32)]))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from ctxsim.knn import auto_chunk_size

        torch = self._torch
        qt = self.searcher.check_queries(torch.from_numpy(queries))
        step = auto_chunk_size(self.ntotal, k)
        out_s, out_i = [], []
        with torch.inference_mode():
            for s in range(0, qt.shape[0], step):
                sc, ix = self.searcher.search(qt[s:s + step], k)
                out_s.append(sc.cpu().numpy())
                out_i.append(ix.cpu().numpy())
        return np.concatenate(out_s), np.concatenate(out_i)


class TorchEngine:
    """Exact search over the stored embeddings (no file of its own: the embeddings are its index)."""

    index_types: ClassVar[tuple[str, ...]] = ("torch",)
    own_file: ClassVar[bool] = False

    def build(self, embeddings: np.ndarray, index_type: str, params: dict[str, int], gpu: bool = False,
              device: str | None = None) -> IndexBackend:
        return TorchExact(embeddings, device)

    def save(self, backend: IndexBackend, path: Path) -> None:
        raise NotImplementedError("the torch engine has no index file: its index is the stored embeddings")

    def load(self, folder: Path, info: IndexInfo, gpu: bool = False, device: str | None = None) -> IndexBackend:
        """The embeddings file ``info`` names, read whole and checked against its dimension."""
        path = folder / info.files["embeddings"]
        emb = read_embeddings(path)
        if emb.ndim != 2 or emb.shape[1] != info.dim:
            raise ArtifactError(f"{path} holds embeddings of shape {emb.shape}, not [{info.count}, {info.dim}] "
                                f"as {META} says; rebuild the index")
        return TorchExact(emb, device)


_ENGINES: dict[str, IndexEngine] = {t: engine for engine in (FaissEngine(), TorchEngine())
                                    for t in engine.index_types}


def engine_for(index_type: str) -> IndexEngine:
    """The engine of ``index_type`` (ConfigError naming the known types for any other)."""
    check_index_type(index_type)
    return _ENGINES[index_type]
