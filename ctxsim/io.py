"""Atomic file writes and hashing: every artifact ctxsim writes goes through here.

A write goes to a temporary file in the target's folder, named ``.<target>.<pid>-<host>.<random>.tmp``, which is
flushed, fsynced, made 0644 (less the umask) and renamed onto the target with ``os.replace``. After each successful
write the folder is swept of stale temporaries of that naming (killed writers): see :func:`sweep_stale_temps`.

``CTXSIM_FAULT`` is a test hook, inert unless set: ``CTXSIM_FAULT=<point>`` or ``<point>#<n>`` makes the process
SIGKILL itself the n-th time (default first) it reaches that named point. Every atomic write passes three points,
``<target name>:created`` (empty temporary made), ``<target name>:written`` (temporary complete and fsynced, not yet
renamed) and ``<target name>:replaced`` (renamed onto the target); callers may add their own with
:func:`fault_point`. tests/core/test_checkpoint_faults.py uses it to kill training inside a checkpoint write.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["FAULT_ENV", "REUSED_PID_AFTER_S", "STALE_AFTER_S", "atomic_path", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_safetensors", "atomic_write_text", "fault_point", "read_json", "sha256_file",
           "sweep_stale_temps"]

FAULT_ENV = "CTXSIM_FAULT"
_fault_hits: dict[str, int] = {}

# a temporary whose writer cannot be proven dead is removed only once it is this old (seconds)
STALE_AFTER_S = 3600.0
# one of our own (same host, pid namespace and boot) whose pid is alive is still kept this long (pid reuse guard)
REUSED_PID_AFTER_S = 24 * 3600.0

# .<target>.<pid>-<host tag>.<random>.tmp: this version's temporaries
_OWN_TMP = re.compile(r"^\..+\.(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})\.[a-z0-9_]{8}\.tmp$")
# .<target>.<random>.tmp (ctxsim before pid tags) and .tmpXXXXXX (safetensors' own temporary, inside an old
# ctxsim write): no writer to check, so age alone decides
_LEGACY_TMP = re.compile(r"^(\..+\.[a-z0-9_]{8}\.tmp|\.tmp[A-Za-z0-9]{6})$")


def fault_point(name: str) -> None:
    """Test hook: SIGKILL this process here when ``CTXSIM_FAULT`` names this point (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.rpartition("#") if "#" in spec else (spec, "", "1")
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(nth):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """8 hex digits naming this host, boot and pid namespace: where a temporary's pid can be checked."""
    parts = [socket.gethostname()]
    for src in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        with contextlib.suppress(OSError):
            parts.append(os.readlink(src) if src.endswith("/pid") else Path(src).read_text().strip())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _is_stale(name: str, age: float) -> bool:
    m = _OWN_TMP.match(name)
    if m:
        if m["tag"] == _host_tag():
            return not _pid_alive(int(m["pid"])) or age > REUSED_PID_AFTER_S
        return age > STALE_AFTER_S  # written from another host or container: its pid means nothing here
    return bool(_LEGACY_TMP.match(name)) and age > STALE_AFTER_S


def sweep_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporaries of ctxsim's naming left in ``folder`` by killed writers; returns what was removed.

    A temporary of this host (same hostname, boot and pid namespace) is stale as soon as the pid in its name is
    dead; any other of ctxsim's pattern (another host's, or an older ctxsim's without a pid) only once untouched
    for ``STALE_AFTER_S``. A concurrent writer's temporary is therefore never removed. Other files are never touched.
    """
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and (entry.name.endswith(".tmp") or entry.name.startswith(".tmp"))):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if _is_stale(entry.name, now - entry.stat(follow_symlinks=False).st_mtime):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success fsync it and ``os.replace`` it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. The file ends up mode 0644
    (less the umask) even when the writer replaced the temporary with a file of its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-{_host_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    mode = 0o666 & ~_umask()  # mkstemp makes 0600; artifacts must be readable by e.g. a Triton container
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, mode)
        fault_point(f"{path.name}:created")
        yield tmp_path
        os.chmod(tmp_path, mode)  # again: a writer may have renamed its own (0600) file onto the temporary
        with open(tmp_path, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"{path.name}:written")
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    fault_point(f"{path.name}:replaced")
    sweep_stale_temps(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                             metadata: Mapping[str, str] | None = None) -> None:
    """Write torch tensors as a safetensors file through :func:`atomic_path`.

    Serialised in memory: ``safetensors.torch.save_file`` writes a temporary of its own (``.tmpXXXXXX``, mode
    0600) and renames it, which would leave litter on a kill and bypass the mode atomic writes set.
    """
    from safetensors.torch import save

    atomic_write_bytes(path, save(dict(tensors), dict(metadata) if metadata is not None else None))


def read_json(path: str | os.PathLike) -> Any:
    from ctxsim.errors import ArtifactError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-create it") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
