"""Global pooling of a feature map to a vector: average, max, or generalised mean (GeM)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctxsim.errors import ConfigError

__all__ = ["GeM", "build_pooling", "l2_normalize"]


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al.) with a learnable exponent p."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class _Global(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3)) if self.op == "max" else x.mean(dim=(2, 3))


def build_pooling(name: str) -> nn.Module:
    if name in ("avg", "max"):
        return _Global(name)
    if name == "gem":
        return GeM()
    raise ConfigError(f"unknown pooling {name!r}; known: avg, max, gem")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=1)
