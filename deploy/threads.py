"""One threading policy for the compute libraries of ctxsim.deploy, set from one number: ``set_threads(n)``.

A small box (a 2-core VM, a 6-core Jetson that also runs the camera pipeline) is oversubscribed quickly: PyTorch,
ONNX Runtime, FAISS's OpenMP, its OpenBLAS and numpy's OpenBLAS each start a pool the size of the machine, and
ONNX Runtime's pool spin-waits after every run by default (a core kept busy doing nothing, competing with the
server's event loop). ``set_threads(n)`` sets them all together:

- PyTorch intra-op threads = ``n`` (``torch.set_num_threads``), inter-op threads = 1 where still settable;
- ONNX Runtime sessions opened afterwards (``ort_session_config``): ``intra_op_num_threads`` = ``n``,
  ``inter_op_num_threads`` = 1, ``session.intra_op.allow_spinning`` / ``session.inter_op.allow_spinning`` = "0";
- FAISS's OpenMP threads = ``n`` (``faiss.omp_set_num_threads``), and every BLAS / OpenMP pool loaded by then
  (FAISS's OpenBLAS, numpy's) capped at ``n`` through threadpoolctl where installed;
- ``ctxsim serve``: one event loop thread, one batch worker thread (it runs the model and is one of the ``n``
  compute threads: ONNX Runtime and PyTorch count the calling thread), and a decode pool of ``n`` threads used only
  for batches of large uploads (the worker waits meanwhile).

The default ``n`` is ``CTXSIM_THREADS`` when set, else the cores this process may use (CPU affinity and a cgroup
CPU quota, e.g. a container limited to 2 CPUs on a 64-core host); ``ctxsim serve`` keeps one of them for its event
loop (``n`` = cores - 1, at least 1), so that a loaded server runs at most as many busy threads as cores.
``Embedder.from_artifact`` applies the default policy the first time one is opened (``threads=`` to choose);
``ctxsim serve --threads``, ``ctxsim index build --threads``, ``ctxsim search --threads`` and ``ctxsim bench
--threads`` set it from the command line. ``ctxsim serve`` also sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set)
before PyTorch and FAISS load, so their OpenMP threads sleep instead of spinning between calls; from Python, set
it before importing torch. docs/ARCHITECTURE.md ("Threads") and docs/JETSON.md say what to choose.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ctxsim.errors import ConfigError

__all__ = [
    "ENV_THREADS",
    "ThreadPolicy",
    "current_policy",
    "ensure_threads",
    "ort_session_config",
    "resolve_threads",
    "set_threads",
    "usable_cores",
]

logger = logging.getLogger(__name__)

ENV_THREADS = "CTXSIM_THREADS"


@dataclass(frozen=True)
class ThreadPolicy:
    """How many threads each pool gets (see the module docstring)."""

    threads: int          # compute threads: PyTorch intra-op, ONNX Runtime intra-op, FAISS / BLAS
    interop: int = 1      # PyTorch inter-op and ONNX Runtime inter-op threads
    spin: bool = False    # ONNX Runtime spin-waiting between runs (off: the pool sleeps, the event loop runs)
    decode: int = 1       # the server's pool decoding large uploads in parallel
    batch_workers: int = 1  # the server's model thread (one: a batch uses all ``threads`` compute threads)

    def describe(self) -> str:
        return (f"{self.threads} compute thread(s) (torch, ONNX Runtime, FAISS), spinning "
                f"{'on' if self.spin else 'off'}, {self.decode} decode thread(s), {self.batch_workers} batch worker")


_applied: ThreadPolicy | None = None


def _cgroup_cpus() -> float | None:
    """The cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``) CPU quota of this process in CPUs, None if none."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, lowered to a cgroup CPU quota (rounded up) if one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None and quota > 0:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def resolve_threads(threads: int | None = None, spin: bool = False, reserve: int = 0) -> ThreadPolicy:
    """The policy for ``threads`` (None: ``CTXSIM_THREADS``, else :func:`usable_cores` less ``reserve``, at least 1:
    the server reserves a core for its event loop). ConfigError if < 1."""
    if threads is None:
        raw = os.environ.get(ENV_THREADS, "").strip()
        if raw:
            try:
                threads = int(raw)
            except ValueError:
                raise ConfigError(f"{ENV_THREADS} must be a whole number of threads, got {raw!r}") from None
        else:
            threads = max(1, usable_cores() - max(0, int(reserve)))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a whole number >= 1, got {threads!r}")
    return ThreadPolicy(threads=threads, interop=1, spin=bool(spin), decode=threads, batch_workers=1)


def set_threads(threads: int | None = None, spin: bool = False, reserve: int = 0) -> ThreadPolicy:
    """Apply the policy for ``threads`` to PyTorch, FAISS and the BLAS / OpenMP pools loaded now, and make it the one
    ONNX Runtime sessions and ``ctxsim serve`` use from now on. Returns it (see the module docstring and
    :func:`resolve_threads` for ``reserve``)."""
    global _applied
    policy = resolve_threads(threads, spin, reserve)
    import torch

    torch.set_num_threads(policy.threads)
    if torch.get_num_interop_threads() != policy.interop:
        with contextlib.suppress(RuntimeError):  # settable once, before inter-op work started; later calls raise
            torch.set_num_interop_threads(policy.interop)
    faiss = sys.modules.get("faiss")
    if faiss is None:
        try:
            import faiss
        except ImportError:
            faiss = None
    if faiss is not None and hasattr(faiss, "omp_set_num_threads"):
        faiss.omp_set_num_threads(policy.threads)
    try:  # FAISS's bundled OpenBLAS and libgomp, numpy's OpenBLAS: every pool loaded by now
        from threadpoolctl import threadpool_limits

        threadpool_limits(policy.threads)
    except ImportError:
        pass
    if policy != _applied:
        logger.debug("thread policy: %s", policy.describe())
    _applied = policy
    return policy


def ensure_threads(threads: int | None = None) -> ThreadPolicy:
    """``set_threads(threads)`` when ``threads`` is given or no policy was applied in this process yet; else the
    policy in force (what ``Embedder.from_artifact`` calls)."""
    if threads is not None or _applied is None:
        return set_threads(threads)
    return _applied


def current_policy() -> ThreadPolicy | None:
    """The policy applied last in this process (None: none yet)."""
    return _applied


def ort_session_config(policy: ThreadPolicy | None = None) -> dict[str, int | str]:
    """ONNX Runtime session settings of ``policy`` (default: the one in force, else the default policy):
    ``SessionOptions`` attributes and session config entries, as ``ctxsim.export.runners.OnnxRunner`` takes them."""
    p = policy or _applied or resolve_threads()
    spin = "1" if p.spin else "0"
    return {"intra_op_num_threads": p.threads, "inter_op_num_threads": p.interop,
            "session.intra_op.allow_spinning": spin, "session.inter_op.allow_spinning": spin}
