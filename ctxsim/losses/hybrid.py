"""Hybrid loss of Liao et al. (ICML 2023, Eq. 6): contextual + margin contrastive + similarity regulariser.

``weighting="paper"`` (default, Eq. 6): lam * contextual + (1 - lam) * contrastive + gamma * regulariser;
``weighting="official256"`` (the authors' 256-px main.py): lam * contextual + (1 - lam - gamma) * contrastive +
gamma * regulariser, defaults lam 0.4, gamma 0.1, reg_sim 0.25, eps 0.05, margins 0.75 / 0.6, k 4. Registered as
"hybrid", and as "contextual" with lam = 1 (no contrastive term). The terms are computed on S = f f^T in float32
with autocast off, as the official code does; the contextual term's gradient and detach choices are in
``ctxsim.losses.contextual``. The weightings side by side (the 224-px script's included): docs/LOSS.md.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ctxsim.errors import ConfigError
from ctxsim.losses.base import MetricLoss, check_batch, check_float, check_int, float32_region, same_label_matrix
from ctxsim.losses.contextual import contextual_loss, similarity_regularizer
from ctxsim.losses.contrastive import margin_contrastive
from ctxsim.losses.registry import register_loss

__all__ = ["WEIGHTINGS", "ContextualLoss", "HybridLoss"]

WEIGHTINGS = ("paper", "official256")
TERMS = ("contextual", "contrastive", "regularizer")


@register_loss("hybrid")
class HybridLoss(MetricLoss):
    """lam * contextual + w_c * contrastive + gamma * regulariser, w_c = 1 - lam (paper) or 1 - lam - gamma."""

    def __init__(
        self,
        lam: float = 0.4,
        gamma: float = 0.1,
        reg_target: float = 0.25,
        eps: float = 0.05,
        k: int = 4,
        pos_margin: float = 0.75,
        neg_margin: float = 0.6,
        alpha: float = 10.0,
        weighting: str = "paper",
    ) -> None:
        super().__init__()
        self.lam = check_float("lam", lam, 0.0, 1.0)
        self.gamma = check_float("gamma", gamma, lo=0.0)
        self.reg_target = check_float("reg_target", reg_target, -1.0, 1.0)
        self.eps = check_float("eps", eps, lo=0.0)
        self.k = check_int("k", k, 2)
        self.pos_margin = check_float("pos_margin", pos_margin, -1.0, 1.0)
        self.neg_margin = check_float("neg_margin", neg_margin, -1.0, 1.0)
        self.alpha = check_float("alpha", alpha, lo=0.0, lo_open=True)
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting
        if weighting == "official256" and self.lam + self.gamma > 1.0 + 1e-12:
            raise ConfigError(
                f"with weighting='official256' the contrastive weight 1 - lam - gamma must be >= 0; "
                f"got lam={self.lam}, gamma={self.gamma}"
            )

    def weights(self) -> dict[str, float]:
        """The coefficients of the three terms, keyed as `terms()`."""
        w_con = 1.0 - self.lam if self.weighting == "paper" else 1.0 - self.lam - self.gamma
        return {"contextual": self.lam, "contrastive": max(w_con, 0.0), "regularizer": self.gamma}

    def _prepare(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        f = F.normalize(embeddings.float(), dim=1)
        return f @ f.T, same_label_matrix(labels, f.dtype)

    def _term(self, name: str, sim: Tensor, same: Tensor) -> Tensor:
        if name == "contextual":
            return contextual_loss(sim, same, k=self.k, eps=self.eps, alpha=self.alpha)
        if name == "contrastive":
            return margin_contrastive(sim, same, self.pos_margin, self.neg_margin)
        return similarity_regularizer(sim, self.reg_target)

    def terms(self, embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Each term as a differentiable float32 scalar: keys "contextual", "contrastive", "regularizer"."""
        check_batch(embeddings, labels)
        with float32_region(embeddings.device):
            sim, same = self._prepare(embeddings, labels)
            return {name: self._term(name, sim, same) for name in TERMS}

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        sim, same = self._prepare(embeddings, labels)
        total: Tensor | None = None
        for name, weight in self.weights().items():
            if weight == 0.0:       # a term with weight 0 is not computed
                continue
            part = weight * self._term(name, sim, same)
            total = part if total is None else total + part
        assert total is not None  # the weights always sum to a positive number
        return total

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, gamma={self.gamma}, reg_target={self.reg_target}, eps={self.eps}, k={self.k}, "
                f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, alpha={self.alpha}, "
                f"weighting={self.weighting!r}")


@register_loss("contextual")
class ContextualLoss(HybridLoss):
    """The hybrid loss with lam = 1: contextual loss plus gamma * regulariser, no contrastive term."""

    def __init__(
        self,
        gamma: float = 0.1,
        reg_target: float = 0.25,
        eps: float = 0.05,
        k: int = 4,
        alpha: float = 10.0,
        weighting: str = "paper",
    ) -> None:
        super().__init__(lam=1.0, gamma=gamma, reg_target=reg_target, eps=eps, k=k, alpha=alpha,
                         weighting=weighting)
