"""Whitening and latent moments of the mixing measure; subspace starts (docs/MATH.md §5).

Whiten the design, ``z_j = S^{-1/2} (x_j - xbar)``; then ``softmax(X beta) = softmax(Z gamma)`` with
``gamma = S^{1/2} beta``. Weighted by the observed frequencies, the whitened rows give estimates of the
moments of the mixing measure ``sum_k alpha_k delta_{gamma_k}`` when the design behaves like a Gaussian one:

    M1 = sum_j pihat_j z_j                   ~ sum_k alpha_k gamma_k
    M2 = sum_j pihat_j (z_j z_j^T - I)       ~ sum_k alpha_k gamma_k gamma_k^T
    m_r(v) = sum_j pihat_j He_r(v . z_j)     ~ sum_k alpha_k (v . gamma_k)^r

Only one ``O(p L^2)`` covariance of the design is needed (:class:`Whitening`, cached on a
:class:`~torch_softmix.design.Design`). The method-of-moments estimators built on these moments are in
:mod:`torch_softmix.mom`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .data import TokenCounts
from .kernels import first_row, row_chunks

#: Eigenvalues of the design covariance below this fraction of the largest are treated as zero.
RANK_RTOL = 1e-8


@dataclass
class Whitening:
    """``z = (x - mean) @ W`` with ``W = V Lambda^{-1/2}`` over the ``r`` non-null directions of ``Cov X``.

    ``mean (L,)``, ``W (L, r)`` and ``W_inv (r, L) = Lambda^{1/2} V^T`` in float64;
    ``gamma = beta @ W_inv.T`` and, back, ``beta = gamma @ W.T`` (the minimum-norm atom).
    """

    mean: Tensor
    W: Tensor
    W_inv: Tensor
    eigenvalues: Tensor
    n_rows: int = 0  #: rows of the whole design (all ranks): ``p``

    @property
    def covariance(self) -> Tensor:
        """``Cov X (L, L)`` over the non-null directions: ``W_inv^T W_inv``."""
        return self.W_inv.T @ self.W_inv

    @property
    def rank(self) -> int:
        return self.W.shape[1]

    @classmethod
    def from_design(cls, X: Tensor, chunk_size: int | None = None, comm=None) -> Whitening:
        """Mean and covariance of the ``p`` rows of ``X (p, L)``, in one chunked float64 pass.

        With a ``comm`` over several ranks, ``X`` is this rank's rows: the sums are all-reduced
        (``L^2 + L + 1`` numbers, once).
        """
        L = X.shape[1]
        s = torch.zeros(L * L + L + 1, dtype=torch.float64, device=X.device)
        s1, s2 = s[:L], s[L : L + L * L].view(L, L)
        shift = first_row(X, torch.float64, comm)  # shifted sums: no cancellation when |mean| >> spread
        for _, _, Xc in row_chunks(X, None, torch.float64, chunk_size):
            Xc = Xc - shift
            s1 += Xc.sum(0)
            s2 += Xc.T @ Xc
        s[-1] = X.shape[0]
        if comm is not None:
            comm.sum(s, "whitening")
        p = float(s[-1])
        mean_c = s1 / p
        cov = s2 / p - torch.outer(mean_c, mean_c)
        evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.T))
        keep = evals > RANK_RTOL * float(evals.max().clamp_min(1e-300))
        evals, evecs = evals[keep], canonical_signs(evecs[:, keep])
        return cls(mean_c + shift, evecs / evals.sqrt(), (evecs * evals.sqrt()).T, evals, int(p))

    def to_gamma(self, beta: Tensor) -> Tensor:
        """``(K, L)`` atoms -> ``(K, r)`` whitened atoms."""
        return beta.to(self.W_inv) @ self.W_inv.T

    def to_beta(self, gamma: Tensor) -> Tensor:
        """``(K, r)`` whitened atoms -> ``(K, L)`` atoms."""
        return gamma.to(self.W) @ self.W.T


@dataclass
class LatentMoments:
    """``M1 (r,)`` and ``M2 (r, r)`` from counts, with what is needed to project the support's rows.

    The whitened rows ``z_j`` of the support are never stored (``S x r`` floats could exceed the design
    itself): :meth:`project` recomputes them chunk by chunk and keeps only their projections.
    """

    M1: Tensor
    M2: Tensor
    pihat: Tensor  # (S,) frequencies on the support
    n_tokens: float
    X: Tensor
    support: Tensor
    whitening: Whitening
    chunk_size: int | None = None
    n_distinct: int = 0  # over the whole vocabulary
    comm: object | None = None  # a torch_softmix.dist.Comm when the support's rows are shared among ranks

    def project(self, U: Tensor) -> Tensor:
        """``Z_S U``: the whitened support rows projected on ``U (r, d)``, ``(S, d)`` float64."""
        W = self.whitening.W @ U.to(self.whitening.W)  # (L, d)
        shift = self.whitening.mean @ W
        parts = [Xc @ W - shift for _, _, Xc in row_chunks(self.X, self.support, torch.float64, self.chunk_size)]
        return torch.cat(parts)


def latent_moments(
    X: Tensor, counts: TokenCounts, whitening: Whitening, chunk_size: int | None = None, comm=None
) -> LatentMoments:
    """``M1`` and ``M2`` from counts in one chunked pass over the support's rows (``O(|S| L r)``).

    With a ``comm`` over several ranks, ``X`` and ``counts`` are this rank's rows; the moments are
    all-reduced (``r^2 + r + 2`` numbers, once).
    """
    support = counts.support
    r = whitening.rank
    tot = torch.tensor([counts.values.sum(), support.numel()], dtype=torch.float64, device=X.device)
    if comm is not None:
        comm.sum(tot, "support_total")
    pihat = counts.values / tot[0]
    s = torch.zeros(r + r * r, dtype=torch.float64, device=X.device)
    M1, M2 = s[:r], s[r:].view(r, r)
    for start, stop, Xc in row_chunks(X, support, torch.float64, chunk_size):
        Z = (Xc - whitening.mean) @ whitening.W
        w = pihat[start:stop]
        M1 += w @ Z
        M2 += (Z * w[:, None]).T @ Z
    if comm is not None:
        comm.sum(s, "latent_moments")
    M2 = M2 - torch.eye(r, dtype=M2.dtype, device=M2.device)
    return LatentMoments(
        M1, 0.5 * (M2 + M2.T), pihat, float(tot[0]), X, support, whitening, chunk_size, int(tot[1]), comm
    )


def hermite_moments(t: Tensor, w: Tensor, order: int, comm=None) -> tuple[Tensor, Tensor]:
    """``m_r = sum_j w_j He_r(t_j)`` for ``r = 0..order`` and their sampling variances (per token).

    ``He_0 = 1, He_1 = t, He_{r+1} = t He_r - r He_{r-1}``. Returns two ``(order + 1,)`` float64 tensors.
    With a ``comm``, ``t`` and ``w`` are this rank's part of the support and the sums are all-reduced.
    """
    h_prev, h = torch.ones_like(t), t.clone()
    ms, second = [w.sum()], [w.sum()]
    for r in range(1, order + 1):
        ms.append((w * h).sum())
        second.append((w * h * h).sum())
        h_prev, h = h, t * h - r * h_prev
    both = torch.stack(ms + second)
    if comm is not None:
        comm.sum(both, "hermite")
    m, m2 = both[: order + 1], both[order + 1 :]
    return m, (m2 - m * m).clamp_min(0)


def canonical_signs(V: Tensor) -> Tensor:
    """Eigenvectors (columns of ``V``) with their largest-magnitude entry made positive: ``eigh`` may flip a
    vector's sign when its matrix changes by rounding (another summation order, another number of ranks),
    and random starts drawn in the subspace must not depend on that."""
    idx = V.abs().argmax(dim=0)
    signs = torch.sign(V[idx, torch.arange(V.shape[1], device=V.device)])
    return V * torch.where(signs == 0, torch.ones_like(signs), signs)


def subspace(moments: LatentMoments, K: int) -> tuple[Tensor, Tensor]:
    """Top-``K`` eigenvectors ``U (r, K)`` of ``M2`` and their eigenvalues ``(K,)`` (descending)."""
    evals, evecs = torch.linalg.eigh(moments.M2)
    order = torch.argsort(evals, descending=True)[:K]
    return canonical_signs(evecs[:, order]), evals[order]


def subspace_starts(
    moments: LatentMoments, whitening: Whitening, n_components: int, n_starts: int, gen: torch.Generator
) -> list[tuple[Tensor, Tensor]]:
    """``n_starts`` random starts ``gamma_k = U xi_k``, ``xi_k ~ N(0, (tr M2 / K) I_K)``, uniform ``alpha``."""
    K = n_components
    Kp = min(K, moments.M2.shape[0])
    U, evals = subspace(moments, Kp)
    r2 = max(float(evals.clamp_min(0).sum()), 1e-6) / Kp
    starts = []
    for _ in range(n_starts):
        xi = math.sqrt(r2) * torch.randn(K, Kp, generator=gen, dtype=torch.float64).to(U)
        starts.append((torch.full((K,), 1.0 / K, dtype=torch.float64), whitening.to_beta(xi @ U.T)))
    return starts

