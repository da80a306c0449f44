"""Contextual similarity, contextual loss and similarity regulariser (Liao et al., ICML 2023, Sec. 3, Eqs. 1-5).

Follows the authors' `losses.py` (github.com/Chris210634/metric-learning-using-contextual-similarity:
`get_jaccard_similarity`, `contrastive_jaccard`, `GreaterThan`) operation for operation. For the cosine
similarities S of L2-normalised embeddings and D = max(0, 2 - 2 S):

    N_ij = H(v_i + eps - D_ij)     v_i: distance of i's k-th nearest neighbour (i included); H(0) = 1
    W~_ij = N_ij (|N_i & N_j| / |N_i| + |~N_i & ~N_j| / |~N_i|) / 2;   R_ij = N2_ij N2_ji at the (k/2)-th
    W = R W~ / rowsum(R);   contextual similarity = (W + W^T) / 2
    contextual loss = (1/n^2) sum_{i != j} [y_ij (1 - W'_ij)^2 + (1 - y_ij) W'_ij^2];  regulariser = (mean S - t)^2

H's backward is the heuristic ``alpha * grad`` (official: 10), the whole gradient of the piecewise-constant term;
|N_i|, |~N_i| and the thresholds are detached, rowsum(R) is not; empty sets give 0 where the code gives NaN.
The terms, the detach choices and where the paper's text and the code differ: docs/LOSS.md.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ctxsim.errors import ConfigError
from ctxsim.losses.base import check_float, check_int, same_label_matrix

__all__ = [
    "GreaterThan",
    "contextual_loss",
    "contextual_similarity",
    "greater_than",
    "similarity_regularizer",
]


class GreaterThan(torch.autograd.Function):
    """Step `x >= y` (as x's dtype) with the heuristic straight-through gradient of the official code.

    backward: d/dx = alpha * grad, d/dy = -alpha * grad, each summed to its input's shape (as autograd does
    for broadcast inputs). `alpha` gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, alpha: float) -> Tensor:
        ctx.alpha = float(alpha)
        ctx.x_shape = x.shape
        ctx.y_shape = y.shape
        return (x >= y).to(torch.result_type(x, y))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = (grad * ctx.alpha).sum_to_size(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gy = (grad * -ctx.alpha).sum_to_size(ctx.y_shape)
        return gx, gy, None


def greater_than(x: Tensor, y: Tensor, alpha: float = 10.0) -> Tensor:
    """Functional form of `GreaterThan`: the step x >= y with heuristic gradient +-alpha."""
    return GreaterThan.apply(x, y, alpha)


def _nonzero(den: Tensor) -> Tensor:
    """`den` with zeros replaced by 1 (their numerators are 0 too), keeping the gradient elsewhere."""
    return torch.where(den > 0, den, torch.ones_like(den))


def _check_args(sim: Tensor, k: int, eps: float, alpha: float) -> tuple[int, float, float]:
    k = check_int("k", k, 2)
    eps = check_float("eps", eps, lo=0.0)
    alpha = check_float("alpha", alpha, lo=0.0, lo_open=True)
    if not isinstance(sim, Tensor) or sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        shape = tuple(sim.shape) if isinstance(sim, Tensor) else type(sim).__name__
        raise ConfigError(f"sim must be a square [N, N] similarity matrix, got {shape}")
    n = sim.shape[0]
    if n <= k:
        raise ConfigError(
            f"batch size ({n}) must be larger than k ({k}) for the contextual similarity; "
            f"use a larger batch or a smaller k"
        )
    return k, eps, alpha


def contextual_similarity(sim: Tensor, k: int = 4, eps: float = 0.05, alpha: float = 10.0) -> Tensor:
    """Contextual (Jaccard-like) similarity of a cosine-similarity matrix `sim` [N, N] (Sec. 3).

    Runs in `sim`'s dtype (the losses pass float32). Gradient: the heuristic step gradient (see module doc).
    Requires N > k >= 2.
    """
    k, eps, alpha = _check_args(sim, k, eps, alpha)
    dist = (2.0 - 2.0 * sim).clamp(min=0.0)          # squared Euclidean distance of unit vectors
    vk = (-dist).topk(k, dim=1).values                 # k closest per row, i itself included
    x = -dist + eps

    nk = greater_than(x, vk[:, k - 1:k].detach(), alpha)           # N: within eps of the k-th nearest
    inter = (nk @ nk.T) / _nonzero(nk.sum(1, keepdim=True)).detach()
    nk_not = 1.0 - nk
    inter_not = (nk_not @ nk_not.T) / _nonzero(nk_not.sum(1, keepdim=True)).detach()
    w_tilde = 0.5 * (inter + inter_not) * nk

    nk2 = greater_than(x, vk[:, k // 2 - 1:k // 2].detach(), alpha)  # N2: within eps of the (k/2)-th
    r = nk2 * nk2.T                                                   # mutual (k/2)-neighbours
    w = (r @ w_tilde) / _nonzero(r.sum(1, keepdim=True))              # not detached, as the code
    return 0.5 * (w + w.T)


def _as_same_matrix(same: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    if same.dim() == 1:
        if same.shape[0] != n:
            raise ConfigError(f"labels must have {n} entries, got {same.shape[0]}")
        return same_label_matrix(same, dtype)
    if same.shape != (n, n):
        raise ConfigError(f"same-label matrix must be [{n}, {n}], got {tuple(same.shape)}")
    return same.to(dtype)


def contextual_loss(sim: Tensor, same: Tensor, k: int = 4, eps: float = 0.05, alpha: float = 10.0) -> Tensor:
    """Contextual loss (official `contrastive_jaccard` without its regulariser).

    `same` is either labels [N] or the [N, N] same-label indicator (diagonal 1). Pairs (i, i) are excluded;
    the sum is divided by N^2.
    """
    js = contextual_similarity(sim, k=k, eps=eps, alpha=alpha)
    n = js.shape[0]
    y = _as_same_matrix(same, n, js.dtype)
    off_diag = 1.0 - torch.eye(n, device=js.device, dtype=js.dtype)
    l_pos = (1.0 - js).square() * y * off_diag
    l_neg = js.square() * (1.0 - y) * off_diag
    return (l_pos.sum() + l_neg.sum()) / n / n


def similarity_regularizer(sim: Tensor, target: float = 0.25) -> Tensor:
    """(mean of all entries of `sim`, diagonal included, minus `target`) squared."""
    return (sim.mean() - target).square()
