"""Helpers shared by the speed benchmarks (train_speed, loss_cost, gpu_*): machine name, timing, tables, output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: torch.device | str = "cpu") -> str:
    """'<CPU model>, <N> cores[, <GPU name>]' (cores this process may use), plus the torch version."""
    device = torch.device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu_name()}, {cores} cores, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        text += f" (load average {os.getloadavg()[0]:.1f} when measured: other jobs share these cores)"
    return text + f"; torch {torch.__version__}"


def pick(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda requested but no CUDA GPU is visible")
    return torch.device(device)


def set_cpu_threads(device: torch.device, threads: int | None) -> None:
    """On the CPU, use ``threads`` intra-op threads (default 1: on a shared, oversubscribed machine OpenMP's
    barriers make 2 threads several times slower than 1; pass --threads N on a quiet machine)."""
    if device.type == "cpu":
        torch.set_num_threads(threads or 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, n: int = 1) -> float:
    """Seconds per call of ``fn`` averaged over ``n`` back-to-back calls (synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def calls_for(seconds_per_call: float, target: float) -> int:
    """How many back-to-back calls make one measurement last about ``target`` seconds (at least 1)."""
    return max(1, round(target / max(seconds_per_call, 1e-9)))


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(stem: str, device: torch.device, markdown: str, data: dict, out_dir: str | None,
           dry_run: bool = False) -> dict:
    """Print the table and write <stem>_<device>.md and .json (atomically) into ``out_dir``; without it into
    benchmarks/results and, when the variable OUT is set (a device run), into $OUT as well. A dry run writes only
    where ``out_dir`` says. Returns ``data``."""
    from ctxsim.io import atomic_write_text

    if not dry_run or out_dir:
        dirs = [Path(out_dir)] if out_dir else [RESULTS] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
        for d in dirs:
            atomic_write_text(d / f"{stem}_{device.type}.md", markdown + "\n")
            atomic_write_text(d / f"{stem}_{device.type}.json", json.dumps(data, indent=1) + "\n")
    print(markdown)
    return data
