"""Milvus as a second index engine: the collection holds the vectors, the index folder keeps everything else.

API: ``MILVUS_TYPES``, ``MilvusBackend`` (an ``IndexBackend``: add, search, ntotal), ``create_collection``,
``open_collection``, ``milvus_record``, ``resolve_uri``.

An index folder built with ``--backend milvus`` is the same folder as a FAISS one (index.json, items.<n>.jsonl,
embeddings.<n>.npy, one generation committed by replacing index.json last), without the index.<n>.faiss file: its
vectors live in a Milvus collection, named in index.json's ``milvus`` record (uri, collection, metric_type "IP",
Milvus's index_type and params, search_params: Milvus's own names). The default uri is a Milvus Lite database
file inside the folder (``milvus.db``, embedded, no server); ``http://host:19530`` names a Milvus server (same
client API; not exercised by the tests here). Each row is ``{"id": item id, "embedding": vector}``: the item
table stays in the folder, so ``Index.search`` returns the same ids and items as with FAISS.

Consistency with index.json (docs/SCALE.md): ids are the primary key, and every search and count is filtered by
``id < count`` with ``count`` from the committed index.json. ``index add`` first deletes rows a killed add left
(``id >= count``), inserts, flushes, then commits index.json: a kill anywhere leaves the old count visible (the
rows past it are invisible and deleted by the next add), or the new one. The model fingerprint is also stored in
the collection's properties (and description) and checked when the index is opened. Each build writes a collection
of its own (``ctxsim_<random>`` unless ``--collection`` names one) and drops the previous build's only after
index.json names the new one: a rebuild, killed or not, leaves one whole index.
"""
from __future__ import annotations

import json
import logging
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ctxsim.errors import ArtifactError, ConfigError, FingerprintMismatch, MissingDependency

__all__ = ["DEFAULT_URI", "MILVUS_TYPES", "MilvusBackend", "create_collection", "drop_collection",
           "milvus_record", "new_collection_name", "open_collection", "resolve_uri"]

logger = logging.getLogger(__name__)

#: ctxsim index type -> Milvus index type
MILVUS_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT", "ivf_flat": "IVF_FLAT"}
DEFAULT_URI = "milvus.db"
_INSERT_BATCH = 10_000
_TAG = "ctxsim"  # key of the JSON the collection description holds
_FP_PROP, _DIM_PROP = "ctxsim.fingerprint", "ctxsim.dim"  # the collection's properties


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise MissingDependency("--backend milvus needs pymilvus and, for a local database file, milvus-lite: "
                                "pip install 'ctxsim[milvus]'") from None
    return pymilvus


def resolve_uri(folder: Path, uri: str) -> str:
    """A server address (``scheme://...``) as it is; a Milvus Lite file path relative to the index folder."""
    if "://" in uri:
        return uri
    if not uri.endswith(".db"):
        raise ConfigError(f"a Milvus Lite uri must be a file name ending in .db, got {uri!r} "
                          "(or give a server address, http://host:19530)")
    p = Path(uri)
    return str(p if p.is_absolute() else (folder / p).resolve())


def milvus_record(uri: str, collection: str, index_type: str, params: dict[str, Any]) -> dict[str, Any]:
    """index.json's ``milvus`` record: where the collection is and its index, in Milvus's own names."""
    mtype = MILVUS_TYPES.get(index_type)
    if mtype is None:
        raise ConfigError(f"Milvus index type {index_type!r} is not supported; use flat, hnsw or ivf_flat")
    build: dict[str, int] = {}
    search: dict[str, int] = {}
    if mtype == "HNSW":
        build = {"M": int(params["M"]), "efConstruction": int(params["efConstruction"])}
        search = {"ef": int(params["efSearch"])}
    elif mtype == "IVF_FLAT":
        build, search = {"nlist": int(params["nlist"])}, {"nprobe": int(params["nprobe"])}
    return {"uri": uri, "collection": collection, "metric_type": "IP", "index_type": mtype, "params": build,
            "search_params": search}


# Milvus Lite (3.x) serves a database file from a thread of this process, holding the file's lock until it is
# released: open clients per Lite file, so that the last close releases it (another process can then open it)
_LITE_OPEN: dict[str, int] = {}
_LITE_LOCK = threading.Lock()


def _client(uri: str) -> Any:
    pymilvus = _pymilvus()
    try:
        client = pymilvus.MilvusClient(uri=uri)
    except Exception as e:  # noqa: BLE001 - connection and Lite start-up errors have many types; one line
        raise ArtifactError(f"cannot open Milvus at {uri} ({type(e).__name__}: {e}); is the server up, or the "
                            "database file held by another process?") from None
    if "://" not in uri:
        with _LITE_LOCK:
            _LITE_OPEN[uri] = _LITE_OPEN.get(uri, 0) + 1
    return client


def _close(client: Any, uri: str) -> None:
    try:
        client.close()
    except Exception:
        logger.debug("closing the Milvus client failed", exc_info=True)
    if "://" in uri:
        return
    with _LITE_LOCK:
        left = _LITE_OPEN.get(uri, 0) - 1
        if left > 0:
            _LITE_OPEN[uri] = left
            return
        _LITE_OPEN.pop(uri, None)
    try:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)
    except (ImportError, AttributeError):  # another milvus-lite: its server lives until the process ends
        logger.debug("cannot release the Milvus Lite server of %s", uri)


class MilvusBackend:
    """A Milvus collection seen through index.json's committed ``count`` (rows with ``id < count``)."""

    def __init__(self, client: Any, record: dict[str, Any], count: int, uri: str = "") -> None:
        self.client = client
        self.uri = uri  # as opened (a Lite file resolved to its absolute path)
        self._closed = False
        self.record = record
        self.collection = str(record["collection"])
        self._count = int(count)
        self._search_params = {"metric_type": "IP", "params": dict(record.get("search_params") or {})}

    @property
    def ntotal(self) -> int:
        rows = self.client.query(self.collection, filter=f"id < {self._count}", output_fields=["count(*)"],
                                 consistency_level="Strong")
        return int(rows[0]["count(*)"]) if rows else 0

    def discard_uncommitted(self) -> int:
        """Delete rows past the committed count (what a killed ``index add`` inserted); returns how many."""
        res = self.client.delete(self.collection, filter=f"id >= {self._count}")
        n = int(res.get("delete_count", 0)) if isinstance(res, dict) else len(res or [])
        if n:
            logger.info("deleted %d uncommitted row(s) from Milvus collection %s", n, self.collection)
        return n

    def add(self, embeddings: np.ndarray) -> None:
        """Insert rows with ids count, count+1, ... and flush; they are visible through this backend only
        (others read index.json's count) until the caller commits index.json."""
        emb = np.asarray(embeddings, np.float32)
        start = self._count
        for s in range(0, emb.shape[0], _INSERT_BATCH):
            rows = [{"id": start + s + i, "embedding": v} for i, v in enumerate(emb[s:s + _INSERT_BATCH].tolist())]
            self.client.insert(self.collection, rows)
        self.client.flush(self.collection)
        self._count = start + emb.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        res = self.client.search(self.collection, data=np.asarray(queries, np.float32).tolist(), limit=int(k),
                                 filter=f"id < {self._count}", search_params=self._search_params,
                                 anns_field="embedding", output_fields=[], consistency_level="Strong")
        scores = np.full((len(res), k), -np.inf, np.float32)
        ids = np.full((len(res), k), -1, np.int64)
        for q, hits in enumerate(res):
            for j, h in enumerate(list(hits)[:k]):
                scores[q, j] = float(h["distance"])
                ids[q, j] = int(h["id"])
        return scores, ids

    def close(self) -> None:
        """Close the client (the last one of a Milvus Lite file releases the file for other processes)."""
        if not self._closed:
            self._closed = True
            _close(self.client, self.uri)


def create_collection(folder: Path, record: dict[str, Any], embeddings: np.ndarray, fingerprint: str,
                      overwrite: bool = True) -> MilvusBackend:
    """Create the collection ``record`` names (replacing one of that name when ``overwrite``), index and insert
    ``embeddings`` with ids 0..N-1, and load it for search."""
    pymilvus = _pymilvus()
    uri = resolve_uri(folder, str(record["uri"]))
    client = _client(uri)
    name = str(record["collection"])
    if client.has_collection(name):
        ours = _FP_PROP in (client.describe_collection(name).get("properties") or {})
        if not (overwrite and ours):
            _close(client, uri)
            raise ConfigError(f"Milvus collection {name!r} exists at {record['uri']}"
                              + ("" if ours else " and was not written by ctxsim") + "; pick another --collection")
        client.drop_collection(name)
    d = int(embeddings.shape[1])
    schema = pymilvus.MilvusClient.create_schema(
        auto_id=False, enable_dynamic_field=False,
        description=json.dumps({_TAG: {"fingerprint": fingerprint, "dim": d}}))
    schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
    schema.add_field("embedding", pymilvus.DataType.FLOAT_VECTOR, dim=d)
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="embedding", index_type=record["index_type"], metric_type="IP",
                           params=dict(record.get("params") or {}))
    client.create_collection(name, schema=schema, index_params=index_params, consistency_level="Strong")
    # Milvus Lite keeps no collection description: the binding is in the collection's properties too
    client.alter_collection_properties(name, properties={_FP_PROP: fingerprint, _DIM_PROP: str(d)})
    backend = MilvusBackend(client, record, 0, uri)
    backend.add(embeddings)
    client.load_collection(name)
    return backend


def drop_collection(folder: Path, record: dict[str, Any]) -> None:
    """Drop the collection ``record`` names (a superseded generation's), if it is still there: best effort."""
    try:
        uri = resolve_uri(folder, str(record["uri"]))
        client = _client(uri)
    except Exception:  # noqa: BLE001 - the old database may be gone; nothing to drop then
        return
    try:
        if client.has_collection(str(record["collection"])):
            client.drop_collection(str(record["collection"]))
    except Exception as e:  # noqa: BLE001 - leaving an orphan collection is not an error of the new build
        logger.warning("could not drop the superseded Milvus collection %s: %s", record.get("collection"), e)
    finally:
        _close(client, uri)


def new_collection_name() -> str:
    """A collection name of its own for each build (a rebuild never drops the collection being served)."""
    return f"ctxsim_{uuid.uuid4().hex[:12]}"


def open_collection(folder: Path, record: dict[str, Any], count: int, dim: int, fingerprint: str) -> MilvusBackend:
    """The collection ``record`` names, checked to hold this model's vectors (the fingerprint in its description)."""
    uri = str(record.get("uri") or "")
    name = str(record.get("collection") or "")
    if not uri or not name:
        raise ArtifactError(f"{folder}/index.json: the milvus record names no uri or collection; rebuild the index")
    resolved = resolve_uri(folder, uri)
    client = _client(resolved)
    backend = MilvusBackend(client, record, count, resolved)
    try:
        _check_collection(client, name, uri, dim, fingerprint)
    except BaseException:
        backend.close()
        raise
    return backend


def _check_collection(client: Any, name: str, uri: str, dim: int, fingerprint: str) -> None:
    if not client.has_collection(name):
        raise ArtifactError(f"Milvus at {uri} has no collection {name!r} (dropped, or another database); "
                            "rebuild the index")
    desc = client.describe_collection(name)
    props = desc.get("properties") or {}
    try:
        tag = ({"fingerprint": props[_FP_PROP], "dim": props.get(_DIM_PROP)} if _FP_PROP in props
               else json.loads(desc.get("description") or "{}")[_TAG])
        tag_dim = int(tag.get("dim") or -1)
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, no tag, a tag that is not a mapping
        raise ArtifactError(f"Milvus collection {name!r} was not written by ctxsim; rebuild the index") from None
    if tag.get("fingerprint") != fingerprint:
        raise FingerprintMismatch(f"Milvus collection {name!r} holds vectors of model {tag.get('fingerprint')}, "
                                  f"index.json says {fingerprint}: rebuild the index")
    if tag_dim != dim:
        raise ArtifactError(f"Milvus collection {name!r} holds {tag.get('dim')}-d vectors, not {dim}-d as "
                            "index.json says; rebuild the index")
    client.load_collection(name)
