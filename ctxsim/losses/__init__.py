"""Metric-learning losses: the contextual/hybrid loss of Liao et al. (ICML 2023) and baselines, by name.

`build_loss(name, **params)` builds any registered loss (`available_losses()` lists them). Every loss is an
`nn.Module` with `forward(embeddings [N, D], labels [N]) -> scalar`, computed in float32; losses with
`uses_proxies = True` have parameters of their own for the trainer to optimise.
"""
from __future__ import annotations

from ctxsim.losses import multisimilarity, normsoftmax, proxy_anchor, proxy_nca, triplet  # noqa: F401  (register)
from ctxsim.losses.base import MetricLoss, ProxyMetricLoss, same_label_matrix
from ctxsim.losses.contextual import (
    GreaterThan,
    contextual_loss,
    contextual_similarity,
    greater_than,
    similarity_regularizer,
)
from ctxsim.losses.contrastive import ContrastiveLoss, margin_contrastive
from ctxsim.losses.hybrid import ContextualLoss, HybridLoss
from ctxsim.losses.registry import available_losses, build_loss, get_loss_class, register_loss

__all__ = [
    "ContextualLoss",
    "ContrastiveLoss",
    "GreaterThan",
    "HybridLoss",
    "MetricLoss",
    "ProxyMetricLoss",
    "available_losses",
    "build_loss",
    "contextual_loss",
    "contextual_similarity",
    "get_loss_class",
    "greater_than",
    "margin_contrastive",
    "register_loss",
    "same_label_matrix",
    "similarity_regularizer",
]
