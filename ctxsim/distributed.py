"""Data-parallel training helpers: process-group setup from torchrun's environment and a global-batch gather.

Launch: ``torchrun --nproc_per_node N -m ctxsim.cli train ...`` (or ``ctxsim train --gpus N``, which re-launches
itself through torchrun). torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_from_env` reads them. Backend: NCCL when training on CUDA (each process takes
``cuda:LOCAL_RANK``), gloo on the CPU. Without ``WORLD_SIZE > 1`` nothing is initialised and every helper here is a
no-op for a single process, so the same code path serves both.

Why a gather. The contextual loss (and every pair-based loss) is a function of the whole batch: each anchor's
neighbourhood is taken over *all* other embeddings. Computing it per rank on the local chunk would be a different
loss. So each rank gathers the embeddings and labels of all ranks (the global batch, in rank order, which is
exactly the single-process batch because the samplers give rank r the r-th contiguous chunk of the global batch)
and evaluates the loss on the global batch; the gathered copies carry no gradient, the rank's own chunk keeps
its autograd graph and sits at its own position (:func:`all_gather_with_grad_on_local`).

Gradient scaling, derived. Let the global batch be the concatenation of chunks B_1..B_W (W = world size), the
loss L(e_1, ..., e_W) with e_r = f_theta(B_r). Single process: dL/dtheta = sum_r (dL/de_r)(de_r/dtheta).
On rank r, L is computed from the same values, but only e_r is connected to the graph, so backward gives
g_r = (dL/de_r)(de_r/dtheta): exactly the r-th term of the sum (the gathered copies are bitwise the values the
other ranks hold). DDP then all-reduces the parameter gradients with a MEAN: (1/W) sum_r g_r = (1/W) dL/dtheta.
Back-propagating ``W * L`` instead gives sum_r g_r = dL/dtheta, the single-process gradient. (Equivalently, the
gather's backward could multiply the local gradient by W; the factor must appear exactly once.) The loss value
that is logged and NaN-checked is the unscaled L, identical on every rank.

Parameters of the loss itself (class proxies) are not wrapped by DDP: each rank computes the *full* gradient of
L with respect to them (they see the whole global batch), so after back-propagating W * L their gradient is W
times too large and identical on every rank; the trainer divides it by W (:func:`unscale_local_grads`) and the
ranks stay in sync without communication.

Caveats (documented, not hidden): BatchNorm in training mode (``model.frozen_bn: false``) normalises with the
rank's local batch statistics; on CUDA the trainer converts it to SyncBatchNorm so the statistics are global, on
the CPU (gloo, no SyncBatchNorm) they stay per rank. A loss that draws random numbers itself (a random miner)
draws them per rank.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo", "env_world_size", "init_from_env", "is_initialized", "get_rank", "get_world_size", "is_main",
    "choose_backend", "barrier", "broadcast_object", "broadcast_tensors", "all_gather_with_grad_on_local", "all_gather_no_grad",
    "unscale_local_grads", "shutdown",
]

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
