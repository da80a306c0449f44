"""Shared base for every loss: input checks, float32 outside autocast, and small argument validators."""
from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ctxsim.errors import ConfigError, DataError

__all__ = ["MetricLoss", "float32_region", "same_label_matrix"]


def same_label_matrix(labels: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """[N, N] indicator (as `dtype`) of pairs with the same label; the diagonal is 1."""
    labels = labels.reshape(-1)
    return (labels[:, None] == labels[None, :]).to(dtype)


def float32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast on `device`'s type (a no-op where autocast is not available)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        return contextlib.nullcontext()


def check_batch(embeddings: Tensor, labels: Tensor) -> None:
    """Raise DataError unless embeddings is [N, D] floating point and labels is [N] integer."""
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise DataError(f"embeddings must be a floating-point tensor of shape [N, D], got {shape}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise DataError(f"labels must be a tensor of shape [{embeddings.shape[0]}] (one per embedding), got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"labels must be an integer tensor, got dtype {labels.dtype}")


# ----------------------------------------------------------------------------------------------- validators
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False) -> float:
    bad = not _is_number(value)
    if not bad:
        v = float(value)
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi)
    if bad:
        if lo is not None and hi is not None:
            rng = f"in [{lo}, {hi}]"
        elif lo is not None:
            rng = f"{'>' if lo_open else '>='} {lo}"
        elif hi is not None:
            rng = f"<= {hi}"
        else:
            rng = "finite"
        raise ConfigError(f"{name} must be a number {rng}, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------------- base
class MetricLoss(nn.Module):
    """A metric-learning loss: `forward(embeddings [N, D], labels [N] int) -> scalar`.

    Subclasses implement `compute`, which always receives float32 embeddings with autocast disabled.
    `uses_proxies` is True for losses with their own parameters (class proxies), which the trainer gives
    their own optimizer.
    """

    uses_proxies: ClassVar[bool] = False

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels)
        with float32_region(embeddings.device):
            return self.compute(embeddings.float(), labels)

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError


class ProxyMetricLoss(MetricLoss):
    """A loss with learnable class proxies; labels must be 0..num_classes-1."""

    uses_proxies: ClassVar[bool] = True

    def __init__(self, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, 1)
        self.embedding_dim = check_int("embedding_dim", embedding_dim, 1)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels)
        if embeddings.shape[1] != self.embedding_dim:
            raise DataError(
                f"embeddings have dimension {embeddings.shape[1]} but the loss was built with "
                f"embedding_dim={self.embedding_dim}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DataError(
                f"labels must lie in [0, {self.num_classes}) for a proxy loss built with "
                f"num_classes={self.num_classes}; got range [{int(labels.min())}, {int(labels.max())}]"
            )
        with float32_region(embeddings.device):
            return self.compute(embeddings.float(), labels)
