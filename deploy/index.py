"""Retrieval indexes over L2-normalised embeddings (inner product): build, extend, load and search an index folder.

API: ``Index`` (``search``, ``exact_search``, ``check_model``, ``from_embeddings``), ``build_index``,
``add_to_index``, ``load_index``, ``embed_gallery``, ``check_fingerprint``, ``EmbedderLike``. The engines and
their parameters are in ``ctxsim.deploy.index_backends``, the folder format in ``ctxsim.deploy.index_store``;
their public names are re-exported here.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast, overload

import numpy as np

from ctxsim.deploy.index_backends import (
    FAISS_TYPES,
    INDEX_TYPES,
    IndexBackend,
    IndexEngine,
    TorchExact,
    check_embeddings,
    check_index_type,
    check_params,
    default_params,
    engine_for,
    read_embeddings,
    want_gpu,
)
from ctxsim.deploy.index_store import (
    FORMAT_VERSION,
    META,
    IndexInfo,
    Item,
    check_files_present,
    commit,
    read_index_info,
    read_items,
    verify_files,
    writer_lock,
)
from ctxsim.errors import ArtifactError, ConfigError, DataError, FingerprintMismatch, NonFiniteEmbedding
from ctxsim.io import read_json

if TYPE_CHECKING:
    from typing import TypeAlias

    from ctxsim.deploy.gallery import Gallery, GalleryItem

    #: a gallery as ``ctxsim.deploy.gallery.open_gallery`` takes it: a folder tree, a list file or paths
    GallerySource: TypeAlias = str | os.PathLike[str] | Gallery | Sequence[Any]

__all__ = [
    "FAISS_TYPES",
    "FORMAT_VERSION",
    "INDEX_TYPES",
    "META",
    "EmbedderLike",
    "Index",
    "IndexBackend",
    "IndexEngine",
    "IndexInfo",
    "Item",
    "add_to_index",
    "build_from_embeddings",
    "build_index",
    "check_files_present",
    "check_fingerprint",
    "default_params",
    "embed_gallery",
    "load_index",
    "read_index_info",
]

logger = logging.getLogger(__name__)

class EmbedderLike(Protocol):
    """What indexing needs of a model (``ctxsim.deploy.embedder.Embedder`` is one). ``embed_files(paths)`` is used
    where the object has it (it decodes, maybe on its device, and skips what it cannot read)."""

    @property
    def fingerprint(self) -> str: ...

    @property
    def backend(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, images: Sequence[Any]) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------- the Index
_T = TypeVar("_T")


class _InfoField(Generic[_T]):
    """A read-only attribute of an :class:`Index`: the field of the same name of its ``info`` (IndexInfo)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, index: None, owner: type) -> _InfoField[_T]: ...

    @overload
    def __get__(self, index: Index, owner: type) -> _T: ...

    def __get__(self, index: Index | None, owner: type) -> _T | _InfoField[_T]:
        return self if index is None else cast(_T, getattr(index.info, self.name))

    def __set__(self, index: Index, value: object) -> None:
        raise AttributeError(f"Index.{self.name} is read-only (it is index.json's, in Index.info)")


class Index:
    """A loaded index: ``search(query_embeddings, k) -> (scores [Q, k], ids [Q, k])``, ``items``, ``info``."""

    def __init__(self, info: IndexInfo, items: list[Item], backend: IndexBackend,
                 embeddings: np.ndarray | None = None, embeddings_path: Path | None = None) -> None:
        self.info = info
        self.items = items
        self.backend = backend
        #: the raw FAISS index object (None for index type "torch"); ``Index.search`` calls it directly.
        self.faiss_index = backend if info.index_type in FAISS_TYPES and info.engine is None else None
        self._embeddings = embeddings
        self._embeddings_path = embeddings_path

    # -- attributes: index.json's, read from ``info`` (which ``add_to_index`` updates in place)
    index_type: _InfoField[str] = _InfoField()
    fingerprint: _InfoField[str] = _InfoField()
    dim: _InfoField[int] = _InfoField()
    count: _InfoField[int] = _InfoField()  # also len(index)

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
            self._embeddings = read_embeddings(self._embeddings_path, mmap=True)
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

    def close(self) -> None:
        """Release what the backend holds open (a Milvus client; nothing for FAISS and torch). Also ``with``."""
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_model(self, fingerprint: str) -> None:
        """Refuse a query model other than the one that built the index (FingerprintMismatch)."""
        check_fingerprint(self.info.fingerprint, fingerprint)

    # -- construction in memory
    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, index_type: str = "flat", params: dict[str, Any] | None = None,
                        gpu: bool = False, fingerprint: str = "", items: Sequence[Item] | None = None) -> Index:
        """An in-memory index over ``embeddings`` (not saved; used by benchmarks and tests)."""
        emb = check_embeddings(embeddings)
        n, d = emb.shape
        check_index_type(index_type)
        p = check_params(index_type, params, n, d)
        backend = engine_for(index_type).build(emb, index_type, p, want_gpu(gpu, index_type))
        info = IndexInfo(path="", index_type=index_type, fingerprint=fingerprint, dim=d, count=n, params=p)
        its = list(items) if items is not None else [Item(i, f"#{i}", None) for i in range(n)]
        return cls(info, its, backend, emb)


def check_fingerprint(index_fp: str, query_fp: str) -> None:
    """Raise FingerprintMismatch unless the query model is the model that built the index."""
    if index_fp != query_fp:
        raise FingerprintMismatch(f"index built with model {index_fp}, query model {query_fp}: "
                                  "rebuild the index or use the same model")


def load_index(index_dir: str | os.PathLike[str], verify: bool = True, gpu: bool = False,
               device: str | None = None) -> Index:
    """Load an index folder (sha256-verified unless ``verify=False``); ``gpu`` moves FAISS flat/IVF to the GPU,
    ``device`` places a "torch" index (default: CUDA when available)."""
    folder = Path(index_dir)
    info = read_index_info(folder)
    if info.index_type not in INDEX_TYPES:
        raise ArtifactError(f"{folder}: unknown index type {info.index_type!r}; rebuild the index")
    if verify:
        verify_files(info)
    items = read_items(folder / info.files["items"])
    if len(items) != info.count:
        raise ArtifactError(f"{folder}: {len(items)} items but {META} says {info.count}; rebuild the index")
    emb_path = folder / info.files["embeddings"] if "embeddings" in info.files else None
    backend: IndexBackend
    if info.engine == "milvus":
        from ctxsim.deploy.index_milvus import open_collection

        backend = open_collection(folder, info.milvus or {}, info.count, info.dim, info.fingerprint)
    else:
        backend = engine_for(info.index_type).load(folder, info, gpu=gpu, device=device)
    emb: np.ndarray | None
    if isinstance(backend, TorchExact):
        emb = backend.embeddings  # read whole to search them: kept, not mapped a second time
    else:  # memory-mapped now, so that a later `add` superseding the file does not pull it from under us
        emb = read_embeddings(emb_path, mmap=True) if emb_path is not None else None
    if backend.ntotal != info.count:
        close = getattr(backend, "close", None)
        if callable(close):
            close()
        raise ArtifactError(f"{folder}: the index holds {backend.ntotal} vectors but {META} says {info.count}; "
                            "rebuild the index")
    return Index(info, items, backend, emb, emb_path)


# ---------------------------------------------------------------------------------------------- embedding
def embed_gallery(embedder: EmbedderLike, gallery: GallerySource,
                  progress: Callable[[int, int], None] | None = None
                  ) -> tuple[np.ndarray, list[GalleryItem], list[tuple[str, str]]]:
    """Embed a gallery batch by batch, skipping unreadable images.

    Returns (embeddings [M, D] float32, the M gallery items that were embedded, [(path, reason)] skipped).
    """
    from ctxsim.deploy.gallery import load_images, open_gallery

    g = open_gallery(gallery)
    total = len(g.items)
    bs = max(1, int(getattr(embedder, "batch_size", 64)))
    embs: list[np.ndarray] = []
    kept: list[GalleryItem] = []
    bad: list[tuple[str, str]] = []
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
    url = getattr(getattr(model, "_b", None), "canonical", None)
    if url:  # a Triton model: its URL, not a path
        return str(url)
    try:
        return str(Path(art).expanduser().resolve())
    except TypeError:
        return None


def _previous_generation(folder: Path) -> int:
    if (folder / META).exists():
        with contextlib.suppress(Exception):
            return int(read_json(folder / META).get("generation", 0))
    return 0


def _saver(engine: IndexEngine, backend: IndexBackend | None) -> Callable[[Path], None] | None:
    """What writes the engine's own file of a new generation (None: it has none)."""
    if not engine.own_file or backend is None:
        return None
    return lambda path: engine.save(backend, path)


# ---------------------------------------------------------------------------------------------- build / add
def build_index(gallery: GallerySource, model_artifact: str | os.PathLike[str] | EmbedderLike,
                out_dir: str | os.PathLike[str], index_type: str = "flat", gpu: bool = False,
                progress: Callable[[int, int], None] | None = None, params: dict[str, Any] | None = None,
                batch_size: int = 64, overwrite: bool = True, device_decode: bool = False, engine: str = "faiss",
                uri: str | None = None, collection: str | None = None) -> IndexInfo:
    """Embed ``gallery`` (folder tree, list file or paths) with ``model_artifact`` and write an index folder.

    ``model_artifact``: a run folder, .onnx, .engine, or an :class:`~ctxsim.deploy.embedder.Embedder`.
    ``device_decode``: decode JPEGs on the model's device (a run folder only; see ``Embedder.embed_files``).
    An existing index in ``out_dir`` is replaced atomically (``overwrite=False`` refuses instead).
    ``engine``: "faiss" (the index types above), or "milvus" (flat, hnsw, ivf/ivf_flat in a Milvus collection at
    ``uri``, default a Milvus Lite file in ``out_dir``; see ctxsim.deploy.index_milvus).
    Returns the IndexInfo, with ``skipped`` = [(path, reason)] of the unreadable images.
    """
    from ctxsim.deploy.embedder import as_embedder

    _check_out(out_dir, overwrite)
    embedder: EmbedderLike = _check_engine(engine, index_type, gpu, batch_size, device_decode, model_artifact,
                                           as_embedder)
    emb, kept, bad = embed_gallery(embedder, gallery, progress)
    return build_from_embeddings(emb, [(it.path, it.label) for it in kept], embedder.fingerprint, out_dir,
                                 index_type, gpu=gpu, params=params, overwrite=overwrite, engine=engine, uri=uri,
                                 collection=collection, model=_model_ref(embedder), model_backend=embedder.backend,
                                 skipped=bad)


def _check_out(out_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} exists and is not a folder; pick another output folder")
    if (folder / META).exists() and not overwrite:
        raise ConfigError(f"{folder} already holds an index; use `index add` to extend it or allow overwriting")
    return folder


def _check_engine(engine: str, index_type: str, gpu: bool, batch_size: int, device_decode: bool,
                  model_artifact: Any, as_embedder: Callable[..., Any]) -> Any:
    """Check the engine and index type before the gallery is embedded, then open the model."""
    index_type = _engine_index_type(engine, index_type)
    if engine == "milvus":
        if gpu:
            raise ConfigError("--gpu is for FAISS; a Milvus server places its own indexes")
        _milvus_available()
    else:
        want_gpu(gpu, index_type)  # before the gallery is embedded: a missing GPU fails fast
    return as_embedder(model_artifact, batch_size, device_decode)


def _engine_index_type(engine: str, index_type: str) -> str:
    """ctxsim's index type for ``index_type`` on ``engine`` (Milvus's ivf_flat is ivf); ConfigError when the engine
    is unknown or has no such type."""
    if engine == "milvus":
        from ctxsim.deploy.index_milvus import MILVUS_TYPES

        if index_type not in MILVUS_TYPES:
            raise ConfigError(f"--backend milvus takes --type flat, hnsw or ivf_flat, got {index_type!r}")
        index_type = "ivf" if index_type == "ivf_flat" else index_type
    elif engine != "faiss":
        raise ConfigError(f"unknown index backend {engine!r}; use faiss or milvus")
    check_index_type(index_type)
    return index_type


def _milvus_available() -> None:
    from ctxsim.deploy.index_milvus import _pymilvus

    _pymilvus()


def build_from_embeddings(emb: np.ndarray, paths_labels: Sequence[tuple[str, str | None]], fingerprint: str,
                          out_dir: str | os.PathLike[str], index_type: str = "flat", gpu: bool = False,
                          params: dict[str, Any] | None = None, overwrite: bool = True, engine: str = "faiss",
                          uri: str | None = None, collection: str | None = None, model: str | None = None,
                          model_backend: str | None = None,
                          skipped: list[tuple[str, str]] | None = None) -> IndexInfo:
    """Write an index folder over ``emb`` [N, D] (row i is item i: ``paths_labels[i]``) of model ``fingerprint``."""
    index_type = _engine_index_type(engine, index_type)
    folder = _check_out(out_dir, overwrite)
    bad = list(skipped or [])
    emb = check_embeddings(emb)
    n, d = emb.shape
    if len(paths_labels) != n:
        raise ConfigError(f"{n} embeddings but {len(paths_labels)} items")
    p: dict[str, Any] = check_params(index_type, params, n, d)
    items = [Item(i, path, label) for i, (path, label) in enumerate(paths_labels)]
    if engine == "milvus":
        from ctxsim.deploy.index_milvus import (
            DEFAULT_URI,
            create_collection,
            drop_collection,
            milvus_record,
            new_collection_name,
        )

        record = milvus_record(uri or DEFAULT_URI, collection or new_collection_name(), index_type, p)
        with writer_lock(folder):
            prev_gen = _previous_generation(folder)
            prev: Any = None
            with contextlib.suppress(Exception):
                prev = read_json(folder / META).get("milvus")
            mb = create_collection(folder, record, emb, fingerprint, overwrite=True)
            mb.close()
            info = IndexInfo(path=str(folder), index_type=index_type, fingerprint=fingerprint, dim=d, count=n,
                             params=p, generation=prev_gen, model=model, backend=model_backend, engine="milvus",
                             milvus=record)
            info = commit(folder, info, items, emb, None)
            if isinstance(prev, dict) and (prev.get("uri"), prev.get("collection")) != (record["uri"],
                                                                                       record["collection"]):
                drop_collection(folder, prev)  # the superseded build's, once index.json no longer names it
        info.added, info.skipped = n, bad
        logger.info("indexed %d images (%d skipped) into %s (Milvus %s)", n, len(bad), folder, record["index_type"])
        return info
    gpu = want_gpu(gpu, index_type)
    eng = engine_for(index_type)
    # an engine without a file of its own (torch) searches the stored embeddings: nothing to build before saving
    backend = eng.build(emb, index_type, p, gpu) if eng.own_file else None
    if index_type in ("ivf", "ivfpq"):
        p["trained_on"] = n
    with writer_lock(folder):
        info = IndexInfo(path=str(folder), index_type=index_type, fingerprint=fingerprint, dim=d, count=n,
                         params=p, generation=_previous_generation(folder), model=model, backend=model_backend)
        info = commit(folder, info, items, emb, _saver(eng, backend))
    info.added, info.skipped = n, bad
    logger.info("indexed %d images (%d skipped) into %s (%s)", n, len(bad), folder, index_type)
    return info


def add_to_index(index_dir: str | os.PathLike[str], images: GallerySource,
                 model_artifact: str | os.PathLike[str] | EmbedderLike | None = None,
                 progress: Callable[[int, int], None] | None = None, batch_size: int = 64,
                 device_decode: bool = False) -> IndexInfo:
    """Embed ``images`` (folder tree, list file or paths) and append them; ids continue after the last one.

    The model defaults to the one recorded in index.json; another model is refused (FingerprintMismatch).
    IVF/PQ keep the centroids trained at build time: rebuild when the gallery has grown several times over.
    """
    from ctxsim.deploy.embedder import open_index_model

    folder = Path(index_dir)
    with writer_lock(folder):
        idx = load_index(folder)
        try:
            info = idx.info
            embedder: EmbedderLike = open_index_model(info, model_artifact, batch_size, device_decode)
            emb_new, kept, bad = embed_gallery(embedder, images, progress)
            if emb_new.shape[1] != info.dim:
                raise ArtifactError(f"the model gives {emb_new.shape[1]}-d embeddings but {folder} holds {info.dim}-d")
            start = info.count
            items = idx.items + [Item(start + i, it.path, it.label) for i, it in enumerate(kept)]
            emb = np.concatenate([np.asarray(idx.embeddings, np.float32), emb_new])
            if info.engine == "milvus":  # rows past the committed count are a killed add's: gone before inserting
                from ctxsim.deploy.index_milvus import MilvusBackend

                mb = cast(MilvusBackend, idx.backend)
                mb.discard_uncommitted()
                mb.add(emb_new)
                info = commit(folder, info, items, emb, None)
                info.added, info.skipped = len(kept), bad
                return info
            engine = engine_for(info.index_type)
            if engine.own_file:  # the torch engine's index is the stored embeddings, written below
                idx.backend.add(emb_new)
            trained = info.params.get("trained_on")
            if trained and len(items) > 4 * trained:
                logger.warning("%s: %d items but the IVF centroids were trained on %d; rebuild for best recall",
                               folder, len(items), trained)
            info = commit(folder, info, items, emb, _saver(engine, idx.backend))
        finally:
            idx.close()  # a Milvus client (the Lite file released for other processes)
    info.added, info.skipped = len(kept), bad
    return info
