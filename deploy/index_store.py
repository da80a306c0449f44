"""An index folder on disk: ``index.json`` and the one generation of files it names, written as one unit.

API: ``Item``, ``IndexInfo`` (index.json, checked field by field), ``read_index_info``, ``check_files_present``,
``verify_files`` (sha256), ``read_items``, ``writer_lock``, ``commit``. A folder holds::

    index.json          fingerprint, dim, metric "ip", index type and parameters, count, ctxsim version,
                        created/updated, generation n, file names and their sha256
    index.<n>.faiss     the engine's own index file (absent for "torch" and for engine "milvus", whose
                        vectors are in the Milvus collection index.json's "milvus" record names)
    items.<n>.jsonl     the item table: one {"id", "path", "label"} per line, ids 0..count-1
    embeddings.<n>.npy  the float32 [count, D] embeddings (exact re-ranking, recall checks, torch search, rebuilds)

``commit`` writes a generation's files under new names, replaces ``index.json`` last (the commit point), then
deletes superseded files: a crash leaves the previous generation whole (docs/RELIABILITY.md).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ctxsim.errors import ArtifactError
from ctxsim.io import atomic_path, atomic_write_json, read_json, sha256_file
from ctxsim.schema import check_fields

__all__ = ["FORMAT_VERSION", "META", "IndexInfo", "Item", "check_files_present", "commit", "read_index_info",
           "read_items", "verify_files", "writer_lock"]

FORMAT_VERSION = 1
META = "index.json"
_GEN_FILE = re.compile(r"^(index|items|embeddings)\.(\d+)\.(faiss|jsonl|npy)$")


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
    engine: str | None = None                                                # "milvus"; None: FAISS / torch
    milvus: dict[str, Any] | None = None                                     # uri, collection, index, params
    added: int = 0                                                           # not saved: this call
    skipped: list[tuple[str, str]] = field(default_factory=list)             # not saved: this call

    _SAVED = ("index_type", "fingerprint", "dim", "count", "params", "metric", "ctxsim_version", "created",
              "updated", "generation", "files", "sha256", "model", "backend", "format_version", "engine", "milvus")
    _OPTIONAL = ("engine", "milvus")  # written only when set: a FAISS index.json is as before

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._SAVED if k not in self._OPTIONAL or getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [list(s) for s in self.skipped]
        return d

    @classmethod
    def from_json(cls, folder: Path, d: Any) -> IndexInfo:
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
        if info.engine not in (None, "milvus"):
            raise ArtifactError(f"{where}: unknown engine {info.engine!r}; {hint}")
        if (info.engine == "milvus") != isinstance(info.milvus, dict):
            raise ArtifactError(f"{where}: engine {info.engine!r} and the milvus record disagree; {hint}")
        own_file = info.index_type != "torch" and info.engine is None
        needed = ("items", "index") if own_file else ("items", "embeddings")
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


# ---------------------------------------------------------------------------------------------- reading
def read_index_info(index_dir: str | os.PathLike[str]) -> IndexInfo:
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
    """ArtifactError (one line) when a file that index.json names is missing (no hashing: see ``verify_files``)."""
    folder = Path(info.path)
    for role, name in info.files.items():
        if not (folder / name).is_file():
            raise ArtifactError(f"{folder / name} ({role}) named by {META} is missing; restore it or rebuild the index")


def verify_files(info: IndexInfo) -> None:
    """ArtifactError (one line) unless every file index.json names is present and has its recorded sha256."""
    check_files_present(info)
    folder = Path(info.path)
    for role, name in info.files.items():
        p = folder / name
        want = info.sha256.get(role)
        if want and sha256_file(p) != want:
            raise ArtifactError(f"{p} ({role}) does not match the sha256 in {META} (damaged or replaced); "
                                "rebuild the index")


def read_items(path: Path) -> list[Item]:
    """The item table (one JSON record a line); ArtifactError naming the first line that is not one."""
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


# ---------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's advisory writer lock (``.lock``), so that two ``add`` calls cannot interleave."""
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


def _write_items(path: Path, items: Sequence[Item]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"id": it.id, "path": it.path, "label": it.label}, ensure_ascii=False) + "\n")


def commit(folder: Path, info: IndexInfo, items: Sequence[Item], emb: np.ndarray,
           save_index: Callable[[Path], None] | None) -> IndexInfo:
    """Write a new generation (``save_index(path)`` writes the engine's own file, if it has one), then
    index.json (last), then delete superseded files; ``info`` is updated in place and returned."""
    gen = info.generation + 1
    files = {"items": f"items.{gen}.jsonl", "embeddings": f"embeddings.{gen}.npy"}
    if save_index is not None:
        files["index"] = f"index.{gen}.faiss"
    hashes = {}
    if save_index is not None:
        with atomic_path(folder / files["index"]) as tmp:
            save_index(tmp)
        hashes["index"] = sha256_file(folder / files["index"])
    with atomic_path(folder / files["items"]) as tmp:
        _write_items(tmp, items)
    hashes["items"] = sha256_file(folder / files["items"])
    with atomic_path(folder / files["embeddings"]) as tmp, open(tmp, "wb") as f:
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
