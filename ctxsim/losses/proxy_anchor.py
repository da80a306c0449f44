"""Proxy-anchor loss, a baseline of Liao et al. (ICML 2023), via pytorch-metric-learning.

`ProxyAnchorLoss(num_classes, embedding_dim, margin=0.1, alpha=32)` as the official 224-px script. The proxies
are parameters of this module (`uses_proxies = True`): the trainer optimises them with their own optimizer
(official loss_lr 1e-3).
"""
from __future__ import annotations

from pytorch_metric_learning import losses
from torch import Tensor

from ctxsim.losses.base import ProxyMetricLoss, check_float
from ctxsim.losses.registry import register_loss

__all__ = ["ProxyAnchorLoss"]


@register_loss("proxy-anchor")
class ProxyAnchorLoss(ProxyMetricLoss):
    """Proxy-anchor loss with one learnable proxy per class, in float32."""

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0) -> None:
        super().__init__(num_classes, embedding_dim)
        self.loss_fn = losses.ProxyAnchorLoss(
            num_classes=self.num_classes, embedding_size=self.embedding_dim,
            margin=check_float("margin", margin, lo=0.0), alpha=check_float("alpha", alpha, lo=0.0, lo_open=True),
        )

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(embeddings, labels)
