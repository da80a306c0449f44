"""Proxy-NCA loss, a baseline of Liao et al. (ICML 2023), via pytorch-metric-learning.

`ProxyNCALoss(num_classes, embedding_dim, softmax_scale)`: the official 256-px main.py uses softmax_scale=10
(the default here), the 224-px script 9. The proxies are parameters of this module (`uses_proxies = True`):
the trainer optimises them with their own optimizer (official loss_lr 1e-3).
"""
from __future__ import annotations

from pytorch_metric_learning import losses
from torch import Tensor

from ctxsim.losses.base import ProxyMetricLoss, check_float
from ctxsim.losses.registry import register_loss

__all__ = ["ProxyNCALoss"]


@register_loss("proxy-nca")
class ProxyNCALoss(ProxyMetricLoss):
    """Proxy-NCA loss with one learnable proxy per class, in float32."""

    def __init__(self, num_classes: int, embedding_dim: int, softmax_scale: float = 10.0) -> None:
        super().__init__(num_classes, embedding_dim)
        self.loss_fn = losses.ProxyNCALoss(
            num_classes=self.num_classes, embedding_size=self.embedding_dim,
            softmax_scale=check_float("softmax_scale", softmax_scale, lo=0.0, lo_open=True),
        )

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(embeddings, labels)
