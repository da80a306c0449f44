"""Tests for ctxsim.losses: formulas against naive loop implementations, gradients, registry, argument checks."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from ctxsim.errors import ConfigError, DataError
from ctxsim.losses import (
    GreaterThan,
    HybridLoss,
    available_losses,
    build_loss,
    contextual_loss,
    contextual_similarity,
    margin_contrastive,
    register_loss,
    similarity_regularizer,
)
from ctxsim.losses import registry as registry_mod
from ctxsim.losses.base import MetricLoss

torch.set_num_threads(1)


# ===================================================================== naive reference implementations
# Plain Python floats (double precision), loops over pairs and explicit sets; written from the formulas,
# not from the vectorised code.

def _tolist(s: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in s.detach().double()]


def naive_neighbourhoods(S, k, eps):
    """N_i (k-th nearest, widened by eps) and N2_i ((k//2)-th nearest, widened by eps) as Python sets."""
    n = len(S)
    D = [[max(0.0, 2.0 - 2.0 * S[i][j]) for j in range(n)] for i in range(n)]
    N, N2 = [], []
    for i in range(n):
        ranked = sorted(D[i])
        t, t2 = ranked[k - 1], ranked[k // 2 - 1]
        N.append({j for j in range(n) if -D[i][j] + eps >= -t})
        N2.append({j for j in range(n) if -D[i][j] + eps >= -t2})
    return D, N, N2


def naive_contextual_similarity(S, k, eps):
    n = len(S)
    _, N, N2 = naive_neighbourhoods(S, k, eps)
    everyone = set(range(n))
    Wt = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if j not in N[i]:
                continue
            a = len(N[i] & N[j]) / len(N[i])
            comp_i, comp_j = everyone - N[i], everyone - N[j]
            b = len(comp_i & comp_j) / len(comp_i) if comp_i else 0.0
            Wt[i][j] = 0.5 * (a + b)
    W = [[0.0] * n for _ in range(n)]
    for i in range(n):
        Ri = [l for l in range(n) if l in N2[i] and i in N2[l]]  # mutual (k/2)-neighbours
        for j in range(n):
            W[i][j] = sum(Wt[l][j] for l in Ri) / len(Ri) if Ri else 0.0
    return [[0.5 * (W[i][j] + W[j][i]) for j in range(n)] for i in range(n)]


def naive_contextual_loss(S, labels, k, eps):
    n = len(S)
    js = naive_contextual_similarity(S, k, eps)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if labels[i] == labels[j]:
                total += (1.0 - js[i][j]) ** 2
            else:
                total += js[i][j] ** 2
    return total / (n * n)


def naive_contrastive(S, labels, pm, nm):
    pos, n_pos, neg, n_neg = 0.0, 0, 0.0, 0
    n = len(S)
    for i in range(n):
        for j in range(n):  # diagonal included, as the official code
            if labels[i] == labels[j]:
                v = max(0.0, pm - S[i][j])
                pos += v
                n_pos += v > 0
            else:
                v = max(0.0, S[i][j] - nm)
                neg += v
                n_neg += v > 0
    return (pos / n_pos if n_pos else 0.0) + (neg / n_neg if n_neg else 0.0)


def naive_regularizer(S, target):
    n = len(S)
    return (sum(S[i][j] for i in range(n) for j in range(n)) / (n * n) - target) ** 2


def naive_heuristic_grad(S, labels, k, eps, alpha):
    """d(contextual loss)/dS by the chain rule, with the step's derivative replaced by alpha (the heuristic)
    and the detach choices of the official code (|N_i|, |~N_i| constant; sum_l R_il not constant).
    Only the off-diagonal entries are compared (the diagonal sits on the clamp's kink of D at 0)."""
    n = len(S)
    _, Nset, N2set = naive_neighbourhoods(S, k, eps)
    N = [[1.0 if j in Nset[i] else 0.0 for j in range(n)] for i in range(n)]
    N2 = [[1.0 if j in N2set[i] else 0.0 for j in range(n)] for i in range(n)]
    size = [sum(N[i]) for i in range(n)]
    size_c = [n - size[i] for i in range(n)]
    I = [[sum(N[l][q] * N[b][q] for q in range(n)) for b in range(n)] for l in range(n)]
    J = [[sum((1 - N[l][q]) * (1 - N[b][q]) for q in range(n)) for b in range(n)] for l in range(n)]
    inv_c = [1.0 / size_c[l] if size_c[l] else 0.0 for l in range(n)]
    Wt = [[0.5 * (I[l][b] / size[l] + J[l][b] * inv_c[l]) * N[l][b] for b in range(n)] for l in range(n)]
    R = [[N2[a][l] * N2[l][a] for l in range(n)] for a in range(n)]
    r = [sum(R[a]) for a in range(n)]
    W = [[sum(R[a][l] * Wt[l][b] for l in range(n)) / r[a] for b in range(n)] for a in range(n)]
    js = [[0.5 * (W[i][j] + W[j][i]) for j in range(n)] for i in range(n)]
    G = [[0.0 if i == j else (-2.0 * (1 - js[i][j]) if labels[i] == labels[j] else 2.0 * js[i][j]) / n ** 2
          for j in range(n)] for i in range(n)]
    GW = [[0.5 * (G[a][b] + G[b][a]) for b in range(n)] for a in range(n)]
    GWt = [[sum(GW[a][b] * R[a][l] / r[a] for a in range(n)) for b in range(n)] for l in range(n)]
    GR = [[sum(GW[a][b] * (Wt[l][b] - W[a][b]) for b in range(n)) / r[a] for l in range(n)] for a in range(n)]
    GN = [[0.0] * n for _ in range(n)]
    for l in range(n):
        for b in range(n):
            c = GWt[l][b]
            GN[l][b] += c * 0.5 * (I[l][b] / size[l] + J[l][b] * inv_c[l])   # the factor N_lb
            cI = c * 0.5 * N[l][b] / size[l]                                   # through I_lb = sum_q N_lq N_bq
            cJ = c * 0.5 * N[l][b] * inv_c[l]                                  # through J_lb
            for q in range(n):
                GN[l][q] += cI * N[b][q] - cJ * (1 - N[b][q])
                GN[b][q] += cI * N[l][q] - cJ * (1 - N[l][q])
    GN2 = [[(GR[p][q] + GR[q][p]) * N2[q][p] for q in range(n)] for p in range(n)]
    # N = step(-D + eps - thr), D = 2 - 2 S: dN/dS = 2 * alpha
    return [[2.0 * alpha * (GN[p][q] + GN2[p][q]) for q in range(n)] for p in range(n)]


# ============================================================================================ fixtures
def _well_separated(S, k, eps, margin):
    """True when no distance lies within `margin` of either neighbourhood boundary (no step is near a flip)."""
    n = len(S)
    D = [[max(0.0, 2.0 - 2.0 * S[i][j]) for j in range(n)] for i in range(n)]
    for i in range(n):
        ranked = sorted(D[i])
        for t in (ranked[k - 1], ranked[k // 2 - 1]):
            # the point that defines the threshold is inside for any eps >= 0 (it moves the threshold with it)
            if any(abs(D[i][j] - (t + eps)) < margin for j in range(n) if D[i][j] != t):
                return False
    return True


def random_case(n=10, d=3, n_classes=3, k=4, eps=0.05, margin=2e-3, seed=0, dtype=torch.float64):
    """Normalised embeddings [n, d], labels, and S = f f^T (float64 from a float32 computation when asked)."""
    for s in range(seed, seed + 500):
        g = torch.Generator().manual_seed(s)
        f = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
        labels = torch.randint(0, n_classes, (n,), generator=g)
        S = (f @ f.T).to(dtype)
        if _well_separated(_tolist(S), k, eps, margin):
            return f, labels, S
    raise RuntimeError("no well-separated case found")


# ==================================================================================== the step function
def test_greater_than_forward_and_heuristic_backward_by_hand():
    x = torch.tensor([[0.5, 0.1, 0.3], [0.2, 0.9, -0.4]], requires_grad=True)
    y = torch.tensor([[0.3], [0.2]], requires_grad=True)
    out = GreaterThan.apply(x, y, 7.0)
    assert out.tolist() == [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]  # ties (0.3 >= 0.3, 0.2 >= 0.2) give 1
    g = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]])
    out.backward(g)
    assert torch.equal(x.grad, 7.0 * g)
    assert y.grad.shape == (2, 1)
    assert torch.allclose(y.grad, torch.tensor([[-7.0 * 6.0], [-7.0 * 3.5]]))


def test_greater_than_default_alpha_is_official_10():
    x = torch.zeros(2, 2, requires_grad=True)
    y = torch.zeros(2, 1)
    from ctxsim.losses import greater_than
    greater_than(x, y).sum().backward()
    assert torch.equal(x.grad, torch.full((2, 2), 10.0))


# ============================================================================== contextual similarity
def test_contextual_similarity_hand_case():
    # Three points: 0 and 1 close (S=0.9, D=0.2); 2 far from both (S=0.1 / 0.0, D=1.8 / 2.0). k=2, eps=0.05.
    # N_0 = N_1 = {0,1}; N_2 = {2, 0}. ~N_0 = ~N_1 = {2}, ~N_2 = {1}. N2_i = {i} (within eps of itself), R = I.
    # W~_01 = (2/2 + 1/1)/2 = 1, W~_20 = (|{0}|/2 + |{}|/1)/2 = 0.25, W~_02 = 0 (2 not in N_0), W~_21 = 0.
    S = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.0], [0.1, 0.0, 1.0]], dtype=torch.float64)
    js = contextual_similarity(S, k=2, eps=0.05)
    expected = torch.tensor([[1.0, 1.0, 0.125], [1.0, 1.0, 0.0], [0.125, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(js, expected, atol=1e-12)
    # contextual loss with labels (0, 0, 1): only the negative pair (0, 2) is off: 2 * 0.125^2 / 9
    loss = contextual_loss(S, torch.tensor([0, 0, 1]), k=2, eps=0.05)
    assert loss.item() == pytest.approx(2 * 0.125 ** 2 / 9, abs=1e-15)


def test_contextual_similarity_two_tight_pairs():
    # {0,1} and {2,3} are tight pairs, far from each other: contextual similarity 1 within, 0 across.
    S = torch.tensor([[1.0, 0.95, 0.0, 0.1],
                      [0.95, 1.0, 0.05, 0.0],
                      [0.0, 0.05, 1.0, 0.9],
                      [0.1, 0.0, 0.9, 1.0]], dtype=torch.float64)
    js = contextual_similarity(S, k=2, eps=0.05)
    block = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float64)
    assert torch.allclose(js, block, atol=1e-12)
    assert contextual_loss(S, torch.tensor([0, 0, 1, 1]), k=2, eps=0.05).item() == 0.0
    # labels that cut across the pairs: each row has one wrong "1" and one wrong "0": 8 unit errors / 16
    assert contextual_loss(S, torch.tensor([0, 1, 1, 0]), k=2, eps=0.05).item() == pytest.approx(0.5)


@pytest.mark.parametrize("k,eps,seed", [(2, 0.05, 0), (4, 0.05, 1), (4, 0.0, 2), (5, 0.05, 3), (4, 0.3, 4),
                                        (3, 0.1, 5)])
def test_contextual_similarity_matches_naive(k, eps, seed):
    _, labels, S = random_case(n=11, k=k, eps=eps, seed=100 * seed)
    got = contextual_similarity(S, k=k, eps=eps)
    want = torch.tensor(naive_contextual_similarity(_tolist(S), k, eps), dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)
    got_loss = contextual_loss(S, labels, k=k, eps=eps)
    assert got_loss.item() == pytest.approx(naive_contextual_loss(_tolist(S), labels.tolist(), k, eps), abs=1e-12)
    # labels [N] and the [N, N] indicator give the same loss
    same = (labels[:, None] == labels[None, :]).double()
    assert contextual_loss(S, same, k=k, eps=eps).item() == got_loss.item()


def test_contextual_similarity_whole_batch_neighbourhood_is_finite():
    # eps so large that every N_i is the whole batch: the official code divides 0 by 0 (NaN); here the
    # complement term is 0 and the result matches the naive definition.
    _, _labels, S = random_case(n=6, k=2, eps=4.5, seed=7)
    js = contextual_similarity(S, k=2, eps=4.5)
    assert torch.isfinite(js).all()
    want = torch.tensor(naive_contextual_similarity(_tolist(S), 2, 4.5), dtype=torch.float64)
    assert torch.allclose(js, want, atol=1e-12)


# ===================================================================== contextual loss: the gradient
def test_contextual_loss_gradient_hand_case():
    # The 3-point case of test_contextual_similarity_hand_case, labels (0, 0, 1). By hand:
    # G = dL/djs: only (0,2),(2,0) non-zero: g = 2 * 0.125 / 9. R = I, so through W~_02 (factor N_02) and
    # W~_20 = (I_20/|N_2| + J_20/|~N_2|) N_20 / 2 with I_20 = sum_q N_2q N_0q, J_20 = sum_q (1-N_2q)(1-N_0q):
    #   dL/dN_01 = -g/2, dL/dN_02 = g/2, dL/dN_20 = g/2, dL/dN_21 = g/4, dL/dN_22 = -g/2, row 1: 0;
    #   the R path gives 0 (N2 = I kills every term). dL/dS = 2 * alpha * dL/dN (D = 2 - 2 S).
    S = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.0], [0.1, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    contextual_loss(S, torch.tensor([0, 0, 1]), k=2, eps=0.05, alpha=10.0).backward()
    g = 2 * 0.125 / 9
    by_hand = 20.0 * torch.tensor([[0.0, -g / 2, g / 2], [0.0, 0.0, 0.0], [g / 2, g / 4, 0.0]], dtype=torch.float64)
    off = ~torch.eye(3, dtype=torch.bool)
    assert torch.allclose(S.grad[off], by_hand[off], atol=1e-14)
    assert S.grad[1, 0] == 0.0 and S.grad[1, 2] == 0.0


@pytest.mark.parametrize("k,eps,seed", [(4, 0.05, 0), (2, 0.05, 1), (5, 0.1, 2)])
def test_contextual_loss_gradient_is_zero_fd_plus_heuristic(k, eps, seed):
    _, labels, S0 = random_case(n=9, k=k, eps=eps, margin=5e-3, seed=1000 + 100 * seed)
    S = S0.clone().requires_grad_(True)
    loss = contextual_loss(S, labels, k=k, eps=eps, alpha=10.0)
    loss.backward()
    # Finite-difference part: small perturbations flip no step, so the loss (piecewise constant) is unchanged.
    base = _tolist(S0)
    _, N_ref, N2_ref = naive_neighbourhoods(base, k, eps)
    h = 1e-4
    n = S0.shape[0]
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            for sgn in (1.0, -1.0):
                P = S0.clone()
                P[i, j] += sgn * h
                _, N_p, N2_p = naive_neighbourhoods(_tolist(P), k, eps)
                assert N_p == N_ref and N2_p == N2_ref, "perturbation flipped a step; the case is too close"
                assert contextual_loss(P, labels, k=k, eps=eps).item() == loss.item()
    # So the whole gradient is the heuristic part, computed independently by the chain rule with loops.
    want = torch.tensor(naive_heuristic_grad(base, labels.tolist(), k, eps, 10.0), dtype=torch.float64)
    off = ~torch.eye(n, dtype=torch.bool)
    assert S.grad.abs().sum() > 0
    assert torch.allclose(S.grad[off], want[off], atol=1e-12, rtol=1e-9)


def test_alpha_scales_the_contextual_gradient_proportionally():
    _, labels, S0 = random_case(n=9, k=4, eps=0.05, seed=5)
    grads = {}
    for alpha in (10.0, 25.0):
        S = S0.clone().requires_grad_(True)
        contextual_loss(S, labels, k=4, eps=0.05, alpha=alpha).backward()
        grads[alpha] = S.grad
    assert grads[10.0].abs().sum() > 0
    assert torch.allclose(grads[25.0], 2.5 * grads[10.0], atol=1e-12)
    # through the hybrid module: only the contextual term depends on alpha
    f, labels, _ = random_case(n=9, k=4, eps=0.05, seed=5)
    g = {}
    for alpha in (10.0, 30.0):
        x = f.float().clone().requires_grad_(True)
        HybridLoss(alpha=alpha).terms(x, labels)["contextual"].backward()
        g[alpha] = x.grad
    assert torch.allclose(g[30.0], 3.0 * g[10.0], atol=1e-5, rtol=1e-4)


# ============================================================================= contrastive, regulariser
def _random_sim_away_from(margins, n=8, seed=0, gap=0.02):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1
    for m in margins:
        near = (S - m).abs() < gap
        S[near] = m + 2 * gap   # move away from the kinks of relu
    S.fill_diagonal_(1.0)
    return S


@pytest.mark.parametrize("pm,nm,seed", [(0.9, 0.6, 0), (0.75, 0.6, 1), (0.5, -0.2, 2), (1.0, -1.0, 3)])
def test_margin_contrastive_matches_naive(pm, nm, seed):
    S = _random_sim_away_from((pm, nm), n=9, seed=seed)
    labels = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(seed))
    w = (labels[:, None] == labels[None, :]).double()
    got = margin_contrastive(S, w, pos_margin=pm, neg_margin=nm)
    assert got.item() == pytest.approx(naive_contrastive(_tolist(S), labels.tolist(), pm, nm), abs=1e-12)


def test_margin_contrastive_hand_case():
    # 2 classes of 2. Positives (0,1),(1,0): relu(0.9 - 0.5) = 0.4 each; diagonal inactive (1 > 0.9).
    # Negatives: S_02 = 0.7 -> 0.1 (twice, symmetric), the rest below 0.6. loss = 0.8/2 + 0.2/2 = 0.5
    S = torch.tensor([[1.0, 0.5, 0.7, 0.0], [0.5, 1.0, 0.1, 0.2], [0.7, 0.1, 1.0, 0.95], [0.0, 0.2, 0.95, 1.0]])
    w = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    assert margin_contrastive(S, w, 0.9, 0.6).item() == pytest.approx(0.5)


def test_margin_contrastive_gradcheck():
    S = _random_sim_away_from((0.75, 0.6), n=7, seed=11).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    w = (labels[:, None] == labels[None, :]).double()
    assert torch.autograd.gradcheck(lambda s: margin_contrastive(s, w, 0.75, 0.6), (S,), eps=1e-6, atol=1e-7)


def test_margin_contrastive_is_zero_with_no_active_entry():
    labels = torch.tensor([0, 0, 1, 1])
    w = (labels[:, None] == labels[None, :]).float()
    S = torch.tensor([[1.0, 0.95, 0.1, -0.3], [0.95, 1.0, 0.5, 0.0], [0.1, 0.5, 1.0, 0.92], [-0.3, 0.0, 0.92, 1.0]],
                     requires_grad=True)
    loss = margin_contrastive(S, w, 0.9, 0.6)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(S.grad, torch.zeros_like(S))
    # only the negative side active: the positive term contributes exactly 0
    S2 = S.detach().clone()
    S2[0, 2] = 0.8
    assert margin_contrastive(S2, w, 0.9, 0.6).item() == pytest.approx(0.2)


def test_regularizer_hand_case_and_gradcheck():
    S = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    assert similarity_regularizer(S, 0.25).item() == pytest.approx(0.25)  # mean 0.75 incl. diagonal
    S = _random_sim_away_from((), n=6, seed=3)
    assert similarity_regularizer(S, 0.1).item() == pytest.approx(naive_regularizer(_tolist(S), 0.1), abs=1e-14)
    S.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: similarity_regularizer(s, 0.25), (S,))


# ================================================================================================ hybrid
@pytest.mark.parametrize("weighting", ["paper", "official256"])
@pytest.mark.parametrize("lam,gamma,seed", [(0.4, 0.1, 0), (0.7, 0.2, 1), (0.0, 0.3, 2), (1.0, 0.0, 3)])
def test_hybrid_matches_naive(weighting, lam, gamma, seed):
    k, eps, pm, nm, target = 4, 0.05, 0.75, 0.6, 0.25
    f, labels, _ = random_case(n=12, d=4, k=k, eps=eps, margin=2e-3, seed=10 * seed)
    x = f.float()
    # the module computes S in float32; the naive code uses exactly those numbers, in double precision
    S = _tolist(F.normalize(x, dim=1) @ F.normalize(x, dim=1).T)
    assert _well_separated(S, k, eps, 1e-3)
    lab = labels.tolist()
    ctx = naive_contextual_loss(S, lab, k, eps)
    con = naive_contrastive(S, lab, pm, nm)
    reg = naive_regularizer(S, target)
    w_con = (1 - lam) if weighting == "paper" else (1 - lam - gamma)
    want = lam * ctx + w_con * con + gamma * reg

    loss = HybridLoss(lam=lam, gamma=gamma, reg_target=target, eps=eps, k=k, pos_margin=pm, neg_margin=nm,
                      weighting=weighting)
    assert loss.weights() == pytest.approx({"contextual": lam, "contrastive": w_con, "regularizer": gamma})
    terms = loss.terms(x, labels)
    assert set(terms) == {"contextual", "contrastive", "regularizer"}
    assert terms["contextual"].item() == pytest.approx(ctx, abs=1e-6)
    assert terms["contrastive"].item() == pytest.approx(con, abs=1e-6)
    assert terms["regularizer"].item() == pytest.approx(reg, abs=1e-6)
    out = loss(x, labels)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() == pytest.approx(want, abs=1e-6)


def test_hybrid_default_weights():
    assert HybridLoss().weights() == pytest.approx({"contextual": 0.4, "contrastive": 0.6, "regularizer": 0.1})
    assert HybridLoss(weighting="official256").weights() == pytest.approx(
        {"contextual": 0.4, "contrastive": 0.5, "regularizer": 0.1})


def test_hybrid_terms_are_differentiable_and_normalise_inside():
    f, labels, _ = random_case(n=12, d=4, seed=3)
    x = (3.0 * f.float()).requires_grad_(True)   # not unit length: the loss normalises
    terms = HybridLoss().terms(x, labels)
    ref = HybridLoss().terms(f.float(), labels)
    for name, t in terms.items():
        assert t.requires_grad and t.dim() == 0 and t.dtype == torch.float32
        assert t.item() == pytest.approx(ref[name].item(), abs=1e-6)
        (gx,) = torch.autograd.grad(t, x, retain_graph=True)
        assert torch.isfinite(gx).all() and gx.abs().sum() > 0


def test_contextual_registered_is_hybrid_with_lam_1():
    f, labels, _ = random_case(n=12, d=4, seed=4)
    x = f.float()
    ctx = build_loss("contextual")
    assert isinstance(ctx, HybridLoss)
    assert ctx.weights() == pytest.approx({"contextual": 1.0, "contrastive": 0.0, "regularizer": 0.1})
    assert ctx(x, labels).item() == pytest.approx(HybridLoss(lam=1.0)(x, labels).item(), abs=1e-7)
    t = ctx.terms(x, labels)
    assert ctx(x, labels).item() == pytest.approx(t["contextual"].item() + 0.1 * t["regularizer"].item(), abs=1e-7)
    with pytest.raises(ConfigError, match="gamma"):
        build_loss("contextual", weighting="official256")   # 1 - 1 - 0.1 < 0
    assert build_loss("contextual", weighting="official256", gamma=0.0).weights()["contrastive"] == 0.0


def test_loss_is_float32_under_autocast():
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 8)
    x = torch.randn(12, 6)
    labels = torch.arange(3).repeat_interleave(4)
    loss_fn = HybridLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net(x)
        assert emb.dtype == torch.bfloat16
        # autocast really is active here: a plain float32 matmul would come out in bfloat16
        assert (emb.float() @ emb.float().T).dtype == torch.bfloat16
        inside = loss_fn(emb, labels)
        terms_inside = loss_fn.terms(emb, labels)
    assert inside.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in terms_inside.values())
    outside = loss_fn(emb.detach().float(), labels)
    assert inside.item() == outside.item()
    inside.backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()


def test_contrastive_module_matches_functional():
    f, labels, _ = random_case(n=10, d=4, seed=6)
    x = 2.0 * f.float()
    mod = build_loss("contrastive")
    assert (mod.pos_margin, mod.neg_margin) == (0.9, 0.6)
    fn = F.normalize(x, dim=1)
    want = margin_contrastive(fn @ fn.T, (labels[:, None] == labels[None, :]).float(), 0.9, 0.6)
    assert mod(x, labels).item() == pytest.approx(want.item(), abs=1e-7)


# ============================================================================================== registry
ALL = ["contextual", "contrastive", "hybrid", "multisimilarity", "multisimilarity-miner", "normsoftmax",
       "proxy-anchor", "proxy-nca", "triplet"]
PROXY = {"normsoftmax", "proxy-anchor", "proxy-nca"}


def test_available_losses():
    assert available_losses() == sorted(ALL)


def test_duplicate_name_rejected():
    name = "test-dup-loss"
    try:
        @register_loss(name)
        class A(MetricLoss):
            pass

        with pytest.raises(ConfigError, match=name):
            @register_loss("Test_Dup_Loss")   # the same name after normalisation
            class B(MetricLoss):
                pass
        with pytest.raises(ConfigError, match="hybrid"):
            register_loss("hybrid")(A)
    finally:
        registry_mod._REGISTRY.pop(name, None)
    assert available_losses() == sorted(ALL)


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError) as err:
        build_loss("no-such-loss")
    msg = str(err.value)
    assert "no-such-loss" in msg
    for n in ALL:
        assert n in msg


def test_bad_and_missing_params():
    with pytest.raises(ConfigError, match="margn"):
        build_loss("contrastive", margn=0.5)
    with pytest.raises(ConfigError, match="num_classes"):
        build_loss("proxy-anchor", embedding_dim=8)
    # num_classes / embedding_dim are dropped for losses that do not take them
    assert isinstance(build_loss("hybrid", num_classes=10, embedding_dim=8), HybridLoss)
    # names are case- and underscore-insensitive
    assert type(build_loss("MultiSimilarity_Miner")).__name__ == "MultiSimilarityMinerLoss"
    assert build_loss("hybrid", lam=0.7, weighting="official256").weights()["contrastive"] == pytest.approx(0.2)


@pytest.mark.parametrize("name", ALL)
def test_every_registered_loss_builds_and_backprops(name):
    torch.manual_seed(0)
    x = torch.randn(16, 8, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(4)
    loss_fn = build_loss(name, num_classes=4, embedding_dim=8)
    assert isinstance(loss_fn, MetricLoss)
    out = loss_fn(x, labels)
    assert out.dim() == 0 and torch.isfinite(out) and out.requires_grad
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    params = list(loss_fn.parameters())
    assert loss_fn.uses_proxies == (name in PROXY)
    if name in PROXY:
        assert params and all(p.grad is not None for p in params)
    else:
        assert not params


@pytest.mark.parametrize("name", ALL)
def test_every_registered_loss_is_float32_under_autocast(name):
    torch.manual_seed(1)
    x = torch.randn(16, 8).to(torch.bfloat16)
    labels = torch.arange(4).repeat_interleave(4)
    loss_fn = build_loss(name, num_classes=4, embedding_dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss_fn(x, labels)
    assert inside.dtype == torch.float32
    if name not in {"triplet"}:  # the distance-weighted miner samples at random
        torch.manual_seed(2)
        a = loss_fn(x, labels)
        torch.manual_seed(2)
        assert a.item() == pytest.approx(loss_fn(x.float(), labels).item(), rel=1e-6)


def test_proxy_loss_checks_labels_and_dim():
    loss_fn = build_loss("proxy-nca", num_classes=3, embedding_dim=4)
    with pytest.raises(DataError, match="num_classes"):
        loss_fn(torch.randn(4, 4), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(DataError, match="embedding_dim"):
        loss_fn(torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))


def test_batch_shape_errors():
    with pytest.raises(DataError, match="labels"):
        HybridLoss()(torch.randn(8, 4), torch.zeros(7, dtype=torch.long))
    with pytest.raises(DataError, match="integer"):
        HybridLoss()(torch.randn(8, 4), torch.zeros(8))


# ======================================================================================= argument checks
@pytest.mark.parametrize("kwargs,arg", [
    ({"k": 1}, "k"), ({"k": 2.5}, "k"), ({"k": True}, "k"),
    ({"pos_margin": 1.5}, "pos_margin"), ({"neg_margin": -1.2}, "neg_margin"),
    ({"lam": -0.1}, "lam"), ({"lam": 1.1}, "lam"), ({"gamma": -0.01}, "gamma"),
    ({"eps": -0.05}, "eps"), ({"alpha": 0.0}, "alpha"), ({"alpha": -1.0}, "alpha"),
    ({"weighting": "eq7"}, "weighting"), ({"lam": "0.4"}, "lam"), ({"gamma": math.nan}, "gamma"),
    ({"lam": 0.8, "gamma": 0.3, "weighting": "official256"}, "lam"),
])
def test_hybrid_argument_checks(kwargs, arg):
    with pytest.raises(ConfigError, match=arg):
        HybridLoss(**kwargs)


def test_lam_bounds_are_inclusive():
    HybridLoss(lam=0.0)
    HybridLoss(lam=1.0)
    HybridLoss(eps=0.0, gamma=0.0)


@pytest.mark.parametrize("kwargs,arg", [({"pos_margin": 1.01}, "pos_margin"), ({"neg_margin": -2.0}, "neg_margin")])
def test_contrastive_argument_checks(kwargs, arg):
    with pytest.raises(ConfigError, match=arg):
        build_loss("contrastive", **kwargs)


def test_batch_must_be_larger_than_k_at_call_time():
    loss_fn = HybridLoss(k=4)   # fine to build
    x = F.normalize(torch.randn(4, 8), dim=1)
    with pytest.raises(ConfigError, match=r"k \(4\)"):
        loss_fn(x, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ConfigError, match="k"):
        contextual_similarity(x @ x.T, k=4)
    with pytest.raises(ConfigError, match="alpha"):
        contextual_similarity(torch.eye(6), k=2, alpha=0.0)
    assert torch.isfinite(loss_fn(torch.randn(5, 8), torch.tensor([0, 0, 1, 1, 2])))


def test_random_labels_and_shapes_smoke():
    rng = random.Random(0)
    loss_fn = HybridLoss()
    for _ in range(5):
        n = rng.randint(5, 20)
        x = torch.randn(n, rng.randint(2, 16))
        y = torch.tensor([rng.randint(0, 3) for _ in range(n)])
        assert torch.isfinite(loss_fn(x, y))
