"""Publishing an export folder as one unit: ``export_run`` builds everything in a staging folder inside it, then
moves the files into place with ``manifest.json`` last.

API: ``staged_export`` (the staging folder inside the export folder, under an advisory lock on it; removed on
failure, or by the next export after a kill) and ``publish`` (``os.replace`` of each file, ``parity.json`` after
the artifacts, ``manifest.json`` last as the commit point, then what the previous manifest bound and the new
export does not produce is removed; files the exports did not write are never touched). Readers check the bytes
against the manifest and the parity records, so a kill between two moves is refused or has no verdict
(docs/RELIABILITY.md).
Test hook: ``CTXSIM_FAULT=publish:<name>`` (``ctxsim.io.fault_point``) SIGKILLs the process after ``<name>`` moved.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ctxsim.export.manifest import MANIFEST
from ctxsim.export.parity import PARITY_FILE
from ctxsim.io import fault_point, read_json

__all__ = ["STAGING_PREFIX", "publish", "staged_export"]

STAGING_PREFIX = ".staging-"
_OLD_PREFIX = ".old-"


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _old_members(folder: Path) -> set[str]:
    """Names (in ``folder``) of what the current manifest binds: artifacts, sidecars, the Triton repository."""
    if not (folder / MANIFEST).is_file():
        return set()
    try:
        manifest = read_json(folder / MANIFEST)
        names = set()
        for rel, entry in (manifest.get("artifacts") or {}).items():
            names.add(rel)
            if isinstance(entry, dict) and entry.get("sidecar"):
                names.add(entry["sidecar"])
        if manifest.get("triton"):
            names.add(manifest["triton"])
    except Exception:  # noqa: BLE001 - an unreadable manifest binds nothing we could safely remove
        return set()
    return {n for n in names if isinstance(n, str) and len(Path(n).parts) == 1 and not Path(n).is_absolute()
            and n not in (".", "..") and not n.startswith(".")}


def _move(src: Path, dst: Path) -> None:
    """``src`` onto ``dst``: a file with ``os.replace``; a folder by renaming the old one aside first."""
    folder = src.is_dir() or (dst.exists() and dst.is_dir() and not dst.is_symlink())
    if folder and (dst.exists() or dst.is_symlink()):
        aside = dst.with_name(f"{_OLD_PREFIX}{dst.name}.{os.getpid()}")
        _remove(aside)
        os.replace(dst, aside)
        os.replace(src, dst)
        _remove(aside)
        return
    os.replace(src, dst)


def publish(stage: Path, folder: Path) -> None:
    """Move the export built in ``stage`` into ``folder``, manifest.json last (see the module docstring)."""
    old = _old_members(folder)
    new = sorted(p.name for p in stage.iterdir() if not p.name.startswith("."))
    if MANIFEST not in new:
        raise RuntimeError(f"{stage} holds no {MANIFEST}; nothing to publish")  # a bug, not a user error
    order = [n for n in new if n not in (MANIFEST, PARITY_FILE)] + [n for n in (PARITY_FILE,) if n in new]
    for n in order:
        _move(stage / n, folder / n)
        fault_point(f"publish:{n}")
    if PARITY_FILE not in new:  # its records are of the previous bytes: no verdict either way, but not kept
        _remove(folder / PARITY_FILE)
    os.replace(stage / MANIFEST, folder / MANIFEST)  # the commit point
    _fsync_dir(folder)
    fault_point(f"publish:{MANIFEST}")
    for n in sorted(old - set(new)):
        _remove(folder / n)
    _remove(stage)


@contextlib.contextmanager
def staged_export(folder: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder inside ``folder`` (created if needed) to build an export in; when the block
    succeeds, :func:`publish` it. On an exception the staging folder is removed (and ``folder`` too, when this call
    created it and it is empty) and ``folder``'s published export is untouched."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    stage = None
    try:
        with _folder_lock(folder):
            for p in folder.iterdir():  # under the lock, any staging folder is a killed export's
                if p.name.startswith((STAGING_PREFIX, _OLD_PREFIX)):
                    _remove(p)
            stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
            yield stage
            publish(stage, folder)
    except BaseException:
        if stage is not None:
            _remove(stage)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
