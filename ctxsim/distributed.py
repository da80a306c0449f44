"""Data-parallel training helpers: process-group setup from torchrun's environment and a global-batch gather.

API: ``init_from_env`` (NCCL on CUDA, rank r on ``cuda:LOCAL_RANK``; gloo on the CPU; a no-op for one process),
``all_gather_with_grad_on_local`` (the global batch in rank order, gradient kept on this rank's chunk, so the
contextual loss sees what a single process sees), ``unscale_local_grads`` (loss parameters outside DDP). The loss
is back-propagated as world size x L so that DDP's mean all-reduce gives the single-process gradient. Launch,
derivation and caveats (BatchNorm statistics, losses that draw random numbers): docs/DISTRIBUTED.md.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = ["DistInfo", "all_gather_no_grad", "all_gather_with_grad_on_local", "barrier", "broadcast_object",
           "broadcast_tensors", "choose_backend", "env_world_size", "get_rank", "get_world_size", "init_from_env",
           "is_initialized", "is_main", "shutdown", "unscale_local_grads"]

#: Collective timeout; rank 0 evaluates alone while the others wait, so it must cover one evaluation.
TIMEOUT_MINUTES = float(os.environ.get("CTXSIM_DIST_TIMEOUT_MIN", "60"))


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None   # None for a single process
    owned: bool = False          # True when init_from_env created the process group (and should destroy it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and reports progress."""
    return get_rank() == 0


def choose_backend(device_type: str) -> str:
    """NCCL for CUDA training (when built with it), gloo otherwise."""
    if device_type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init_from_env(device_type: str = "cpu") -> DistInfo:
    """Initialise the default process group from torchrun's environment when WORLD_SIZE > 1.

    Idempotent: an existing process group is reused (``owned=False``). On CUDA the process's current device is
    set to ``cuda:LOCAL_RANK`` before the group is created.
    """
    if is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, world, local, dist.get_backend(), owned=False)
    world = env_world_size()
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        from ctxsim.errors import ConfigError

        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; run one process")
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = choose_backend(device_type)
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=TIMEOUT_MINUTES),
                            **kwargs)
    log.info("process group: backend %s, rank %d of %d (local rank %d)", backend, rank, world, local)
    return DistInfo(rank, world, local, backend, owned=True)


def shutdown(info: DistInfo | None = None) -> None:
    """Destroy the process group if ``info`` says this code created it (or unconditionally when ``info`` is None)."""
    if is_initialized() and (info is None or info.owned):
        dist.destroy_process_group()


def barrier() -> None:
    if not is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; for small records such as metrics)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor in place with rank ``src``'s values (e.g. parameters kept outside DDP)."""
    if not is_initialized():
        return
    for t in tensors:
        dist.broadcast(t.data, src=src)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0, in rank order (no gradient). All ranks' shapes must match."""
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, 0)


def all_gather_with_grad_on_local(x: torch.Tensor) -> torch.Tensor:
    """The global batch ``cat([x_0, ..., x_{W-1}])`` on every rank; only this rank's slice keeps its gradient.

    The other ranks' slices are plain copies (no autograd). Back-propagating a loss L of the result therefore
    yields this rank's share of dL/dtheta; scale L by the world size under DDP (see the module docstring).
    Every rank must pass the same shape (the samplers guarantee equal local batches). No-op for one process.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, 0)


def unscale_local_grads(params: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Divide the gradients of parameters outside DDP (loss proxies) by ``world_size`` (see module docstring)."""
    if world_size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_div_(grads, float(world_size))
