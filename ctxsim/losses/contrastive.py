"""Margin contrastive loss, the paper's "contrastive" baseline and the hybrid loss's cosine term.

As in the official code (`margin_contrastive` in losses.py of
github.com/Chris210634/metric-learning-using-contextual-similarity), on the cosine-similarity matrix S and
same-label indicator y (diagonal 1):

    L+_ij = relu(m+ - S_ij) * y_ij,    L-_ij = relu(S_ij - m-) * (1 - y_ij)
    loss  = sum L+ / #{L+ > 0}  +  sum L- / #{L- > 0}      (a term with no active entry is 0)

The diagonal is included, as in the code (inactive as long as S_ii = 1 >= m+; with m+ = 1 a rounded
S_ii slightly below 1 counts as a tiny active positive). The paper's contrastive baseline uses
m+ = 0.9, m- = 0.6; the hybrid loss of the 256-px script uses m+ = 0.75, m- = 0.6. Differences from the
official code: a term with no active entry is a 0 that keeps the autograd graph, dtype and device (the code
returns a fresh CPU `torch.tensor(0.)`); the value is the same.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ctxsim.losses.base import MetricLoss, check_float, same_label_matrix
from ctxsim.losses.registry import register_loss

__all__ = ["ContrastiveLoss", "margin_contrastive"]


def margin_contrastive(scores: Tensor, w: Tensor, pos_margin: float = 0.9, neg_margin: float = 0.6) -> Tensor:
    """Margin contrastive loss of a similarity matrix `scores` [N, N] with same-label indicator `w` [N, N]."""
    l_pos = F.relu(pos_margin - scores) * w
    l_neg = F.relu(scores - neg_margin) * (1.0 - w)
    n_pos = (l_pos > 0).sum().clamp(min=1)   # no active entry: the sum is 0 too, so the term is 0
    n_neg = (l_neg > 0).sum().clamp(min=1)
    return l_pos.sum() / n_pos + l_neg.sum() / n_neg


@register_loss("contrastive")
class ContrastiveLoss(MetricLoss):
    """Margin contrastive loss on L2-normalised embeddings (paper baseline: margins 0.9 / 0.6), in float32."""

    def __init__(self, pos_margin: float = 0.9, neg_margin: float = 0.6) -> None:
        super().__init__()
        self.pos_margin = check_float("pos_margin", pos_margin, -1.0, 1.0)
        self.neg_margin = check_float("neg_margin", neg_margin, -1.0, 1.0)

    def compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        f = F.normalize(embeddings, dim=1)
        return margin_contrastive(f @ f.T, same_label_matrix(labels, f.dtype), self.pos_margin, self.neg_margin)

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"
