"""Triplet margin loss with distance-weighted mining, a baseline of Liao et al. (ICML 2023), via pytorch-metric-learning

As the official main.py: `TripletMarginLoss(margin=0.05)` on tuples from `DistanceWeightedMiner()`.
"""
from __future__ import annotations

from pytorch_metric_learning import losses, miners
from torch import Tensor

from ctxsim.losses.base import MetricLoss, check_float
from ctxsim.losses.registry import register_loss

__all__ = ["TripletLoss"]


@register_loss("triplet")
class TripletLoss(MetricLoss):
    """Triplet margin loss (pml) on distance-weighted mined triplets, in float32."""

    def __init__(self, margin: float = 0.05, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4) -> None:
        super().__init__()
        self.margin = check_float("margin", margin, lo=0.0)
        self.miner = miners.DistanceWeightedMiner(
            cutoff=check_float("cutoff", cutoff, lo=0.0),
            nonzero_loss_cutoff=check_float("nonzero_loss_cutoff", nonzero_loss_cutoff, lo=0.0),
        )
        self.loss_fn = losses.TripletMarginLoss(margin=self.margin)

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(embeddings, labels, self.miner(embeddings, labels))
