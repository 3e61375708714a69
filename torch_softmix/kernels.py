"""Chunked passes over the design: where the formulas of MATH.md §1–§3 are evaluated.

Every function here walks the vocabulary (the ``p`` rows of ``X``) in chunks, so the
largest temporary is ``chunk × K`` (or ``chunk × L`` for one component's Hessian) and
nothing of size ``K × p × L`` is ever built. Rows of ``X`` are cast to the dtype of
``beta`` one chunk at a time, so a half-precision embedding is never copied whole.
Log-normalisers and likelihoods are accumulated in float64.

Names follow MATH.md: ``X (p, L)``, ``b (p,)``, ``beta (K, L)``, ``log_alpha (K,)``,
``A(beta) (K,)``, ``m(beta) (K, L)``, ``C(beta) (K, L, L)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Default budget, in elements, for the largest per-chunk temporary.
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(n_rows: int, width: int, chunk_size: int | None = None) -> int:
    """Rows per chunk so that a ``(rows, width)`` temporary stays within the budget."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(1, width)))


def _rows(X: Tensor, bias: Tensor | None, start: int, stop: int, rows: Tensor | None, dtype: torch.dtype):
    """Rows ``start:stop`` of ``X`` (or of ``X[rows]``) and of ``b``, cast to ``dtype``."""
    if rows is None:
        Xc = X[start:stop]
        bc = None if bias is None else bias[start:stop]
    else:
        idx = rows[start:stop]
        Xc = X.index_select(0, idx)
        bc = None if bias is None else bias.index_select(0, idx)
    Xc = Xc.to(dtype)
    bc = None if bc is None else bc.to(dtype)
    return Xc, bc


def design_logits(X: Tensor, beta: Tensor, bias: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """``x_j . beta_k + b_j`` for the tokens ``rows`` (all ``p`` when ``None``).

    Shapes: ``X (p, L)``, ``beta (K, L)``, ``bias (p,)``, ``rows (r,)`` -> ``(r, K)`` in ``beta.dtype``.
    """
    Xc, bc = _rows(X, bias, 0, X.shape[0] if rows is None else rows.numel(), rows, beta.dtype)
    out = Xc @ beta.T
    if bc is not None:
        out = out + bc[:, None]
    return out


@dataclass
class SoftmaxMoments:
    """Moments of the component laws ``s_k = softmax(X beta_k + b)``.

    ``A (K,)`` float64 log-normalisers; ``m (K, L)`` means ``X^T s_k``; ``C (K, L, L)`` covariances
    ``X^T diag(s_k) X - m_k m_k^T``. ``m`` and ``C`` are ``None`` when not asked for.
    """

    A: Tensor
    m: Tensor | None = None
    C: Tensor | None = None

    def select(self, mask: Tensor) -> SoftmaxMoments:
        """The moments of the components where ``mask (K,)`` is true."""
        return SoftmaxMoments(
            self.A[mask],
            None if self.m is None else self.m[mask],
            None if self.C is None else self.C[mask],
        )

    def update(self, mask: Tensor, other: SoftmaxMoments) -> SoftmaxMoments:
        """A copy with the components where ``mask`` is true replaced by ``other``'s."""
        A = self.A.clone()
        A[mask] = other.A
        m = C = None
        if self.m is not None and other.m is not None:
            m = self.m.clone()
            m[mask] = other.m
        if self.C is not None and other.C is not None:
            C = self.C.clone()
            C[mask] = other.C
        return SoftmaxMoments(A, m, C)


def softmax_moments(
    X: Tensor, beta: Tensor, bias: Tensor | None = None, order: int = 0, chunk_size: int | None = None
) -> SoftmaxMoments:
    """Log-normalisers ``A`` and, for ``order >= 1`` / ``2``, the means ``m`` and covariances ``C``.

    One pass over ``X`` with an online (streaming) softmax: running maxima rescale the running
    sums, so no second pass is needed. ``X (p, L)``, ``beta (K, L)`` -> :class:`SoftmaxMoments`.
    Costs ``O(p L K)`` for ``order <= 1`` and ``O(p L^2 K)`` for ``order == 2``.
    """
    p, L = X.shape
    K = beta.shape[0]
    dev, dt = beta.device, beta.dtype
    step = chunk_rows(p, max(K, L), chunk_size)
    mx = torch.full((K,), -torch.inf, dtype=torch.float64, device=dev)
    tot = torch.zeros(K, dtype=torch.float64, device=dev)
    S1 = torch.zeros(K, L, dtype=dt, device=dev) if order >= 1 else None
    S2 = torch.zeros(K, L, L, dtype=dt, device=dev) if order >= 2 else None
    for start in range(0, p, step):
        Xc, bc = _rows(X, bias, start, min(p, start + step), None, dt)
        logits = Xc @ beta.T
        if bc is not None:
            logits = logits + bc[:, None]
        lg = logits.to(torch.float64)
        new_mx = torch.maximum(mx, lg.amax(dim=0))
        scale = torch.exp(mx - new_mx)  # exp(-inf) = 0 on the first chunk
        w = torch.exp(lg - new_mx)  # (c, K) float64
        tot = tot * scale + w.sum(dim=0)
        mx = new_mx
        if order >= 1:
            wd = w.to(dt)
            S1.mul_(scale.to(dt)[:, None]).add_(wd.T @ Xc)
            if order >= 2:
                S2.mul_(scale.to(dt)[:, None, None])
                for k in range(K):
                    S2[k].addmm_(Xc.T, Xc * wd[:, k : k + 1])
    A = mx + torch.log(tot)
    if order == 0:
        return SoftmaxMoments(A)
    inv = (1.0 / tot).to(dt)
    m = S1 * inv[:, None]
    C = None
    if order >= 2:
        C = S2 * inv[:, None, None] - m[:, :, None] * m[:, None, :]
        C = 0.5 * (C + C.transpose(1, 2))
    return SoftmaxMoments(A, m, C)


def log_normalizer(X: Tensor, beta: Tensor, bias: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """``A(beta_k) = logsumexp_j (x_j . beta_k + b_j)``: ``(K,)`` float64."""
    return softmax_moments(X, beta, bias, order=0, chunk_size=chunk_size).A


def component_log_probs(
    X: Tensor, beta: Tensor, A: Tensor, bias: Tensor | None = None, rows: Tensor | None = None
) -> Tensor:
    """``log s_k(j) = x_j . beta_k + b_j - A(beta_k)`` at tokens ``rows``: ``(r, K)`` in ``beta.dtype``."""
    return design_logits(X, beta, bias, rows) - A.to(beta.dtype)


@dataclass
class EStepStats:
    """Sufficient statistics of one E-step (MATH.md §3).

    ``loglik`` float64 scalar ``sum_j n_j log pi_j``; ``W (K,)`` float64 ``sum_j n_j gamma_jk``;
    ``S1 (K, L)`` ``sum_j n_j gamma_jk x_j`` (so ``mu_k = S1_k / W_k``).
    """

    loglik: Tensor
    W: Tensor
    S1: Tensor


def e_step(
    X: Tensor,
    beta: Tensor,
    log_alpha: Tensor,
    A: Tensor,
    support: Tensor,
    n: Tensor,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> EStepStats:
    """The E-step on the support ``S`` of the counts, reduced to sufficient statistics.

    ``log gamma_jk = log_alpha_k + x_j . beta_k + b_j - A(beta_k) - log pi_j`` for ``j`` in ``support (S,)``
    with counts ``n (S,)`` float64. The ``(S, K)`` responsibilities are formed one chunk at a time.
    """
    K, L = beta.shape
    dt = beta.dtype
    step = chunk_rows(support.numel(), max(K, L), chunk_size)
    loglik = torch.zeros((), dtype=torch.float64, device=beta.device)
    W = torch.zeros(K, dtype=torch.float64, device=beta.device)
    S1 = torch.zeros(K, L, dtype=dt, device=beta.device)
    la = log_alpha.to(torch.float64)
    Ad = A.to(torch.float64)
    for start in range(0, support.numel(), step):
        stop = min(support.numel(), start + step)
        Xc, bc = _rows(X, bias, start, stop, support, dt)
        logits = Xc @ beta.T
        if bc is not None:
            logits = logits + bc[:, None]
        joint = logits.to(torch.float64) + (la - Ad)  # (c, K): log alpha_k s_k(j)
        log_pi = torch.logsumexp(joint, dim=1)  # (c,)
        nc = n[start:stop]
        loglik = loglik + (nc * log_pi).sum()
        ngamma = nc[:, None] * torch.exp(joint - log_pi[:, None])  # (c, K)
        W = W + ngamma.sum(dim=0)
        S1 = S1 + ngamma.to(dt).T @ Xc
    return EStepStats(loglik, W, S1)


def column_variance(X: Tensor, chunk_size: int | None = None) -> Tensor:
    """Per-column variance of the rows of ``X (p, L)``: ``(L,)`` float64, in one chunked pass."""
    p, L = X.shape
    step = chunk_rows(p, L, chunk_size)
    s1 = torch.zeros(L, dtype=torch.float64, device=X.device)
    s2 = torch.zeros(L, dtype=torch.float64, device=X.device)
    for start in range(0, p, step):
        Xc = X[start : start + step].to(torch.float64)
        s1 += Xc.sum(0)
        s2 += (Xc * Xc).sum(0)
    mean = s1 / p
    return (s2 / p - mean * mean).clamp_min(0)
