"""The embedding network: backbone -> pooling -> optional standardisation -> linear -> L2 normalise."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ctxsim.errors import ConfigError
from ctxsim.nets.backbones import build_backbone
from ctxsim.nets.pooling import build_pooling, l2_normalize
from ctxsim.schema import check

__all__ = ["EmbeddingNet", "ModelSpec"]


@dataclass
class ModelSpec:
    """Architecture of an embedding network; written to model.json as ``arch``."""

    backbone: str = "resnet50"
    embedding_dim: int = 512
    pooling: str = "max"          # the paper's CUB/Cars network uses max pooling ...
    standardize: bool = True      # ... and LayerNorm without affine before the linear layer
    in_channels: int = 3
    frozen_bn: bool = True        # the paper keeps BatchNorm statistics frozen (backbone.eval())
    pretrained: str | None = None  # torchvision weight name, "imagenet" for lite0, or None

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ConfigError(f"embedding_dim must be >= 1, got {self.embedding_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        """Inverse of :meth:`to_dict`; unknown keys and values of the wrong type are a ConfigError."""
        return check(d, cls, "model")


class EmbeddingNet(nn.Module):
    """Maps normalised float NCHW images to L2-normalised embeddings [N, D]."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.backbone, channels = build_backbone(spec.backbone, spec.pretrained, spec.in_channels)
        self.pool = build_pooling(spec.pooling)
        self.standardize = nn.LayerNorm(channels, elementwise_affine=False) if spec.standardize else nn.Identity()
        self.head = nn.Linear(channels, spec.embedding_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features before the head."""
        return self.pool(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the head runs in float32 so the normalised output is stable under autocast
        f = self.standardize(self.features(x).float())
        return l2_normalize(self.head(f))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.pool.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def train(self, mode: bool = True) -> EmbeddingNet:
        super().train(mode)
        if mode and self.spec.frozen_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()  # keep running statistics fixed; affine parameters still learn
        return self
