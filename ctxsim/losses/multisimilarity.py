"""Multi-similarity loss, a baseline of Liao et al. (ICML 2023), via pytorch-metric-learning.

"multisimilarity" is `MultiSimilarityLoss()` on all pairs, as the official 256-px main.py;
"multisimilarity-miner" adds `MultiSimilarityMiner()` pair mining, as the official 224-px script's variant.
"""
from __future__ import annotations

from pytorch_metric_learning import losses, miners
from torch import Tensor

from ctxsim.losses.base import MetricLoss, check_float
from ctxsim.losses.registry import register_loss

__all__ = ["MultiSimilarityLoss", "MultiSimilarityMinerLoss"]


@register_loss("multisimilarity")
class MultiSimilarityLoss(MetricLoss):
    """Multi-similarity loss (pml defaults alpha=2, beta=50, base=0.5), in float32."""

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5) -> None:
        super().__init__()
        self.loss_fn = losses.MultiSimilarityLoss(
            alpha=check_float("alpha", alpha, lo=0.0, lo_open=True),
            beta=check_float("beta", beta, lo=0.0, lo_open=True),
            base=check_float("base", base, -1.0, 1.0),
        )

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(embeddings, labels)


@register_loss("multisimilarity-miner")
class MultiSimilarityMinerLoss(MultiSimilarityLoss):
    """Multi-similarity loss on pairs mined by `MultiSimilarityMiner(epsilon)`, in float32."""

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1) -> None:
        super().__init__(alpha=alpha, beta=beta, base=base)
        self.miner = miners.MultiSimilarityMiner(epsilon=check_float("epsilon", epsilon, lo=0.0))

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(embeddings, labels, self.miner(embeddings, labels))
