"""Normalised-softmax loss, a baseline of Liao et al. (ICML 2023), via pytorch-metric-learning.

`NormalizedSoftmaxLoss(num_classes, embedding_dim, temperature=0.05)` as the official main.py. The class
weights are parameters of this module (`uses_proxies = True`): the trainer optimises them with their own
optimizer (official loss_lr 1e-3).
"""
from __future__ import annotations

from pytorch_metric_learning import losses
from torch import Tensor

from ctxsim.losses.base import ProxyMetricLoss, check_float
from ctxsim.losses.registry import register_loss

__all__ = ["NormSoftmaxLoss"]


@register_loss("normsoftmax")
class NormSoftmaxLoss(ProxyMetricLoss):
    """Normalised-softmax loss with one learnable class weight per class, in float32."""

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.05) -> None:
        super().__init__(num_classes, embedding_dim)
        self.loss_fn = losses.NormalizedSoftmaxLoss(
            num_classes=self.num_classes, embedding_size=self.embedding_dim,
            temperature=check_float("temperature", temperature, lo=0.0, lo_open=True),
        )

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(embeddings, labels)
