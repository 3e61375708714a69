"""Per-component curvature of the complete-data likelihood: the covariances ``C_k`` and their factors.

Component ``k``'s atom enters the complete-data likelihood through ``W_k A(beta_k)``, whose Hessian is
``W_k C_k`` with ``C_k`` the covariance of the embeddings under the law ``softmax(X beta_k + b)``. The
M-step's Newton systems are ``(W_k C_k + lam I) d = g``, and the L-BFGS phase uses the inverse of the same
blocks as its initial inverse Hessian. On LM designs the laws are peaked: a few thousand tokens carry
nearly all of each law's mass. :func:`covariances` therefore takes each law's ``top`` most probable tokens
exactly and spreads the remaining mass like the rows of ``X`` (``Cov X`` from the design's whitening),
``O(top L^2 K)`` instead of a ``p L^2 K`` pass; small vocabularies get the exact pass. Over several ranks
the same tokens are selected and the same sums formed as in one process.

:class:`BlockPreconditioner` holds the Cholesky factors of ``W_k C_k + lam I`` for the M-step's conjugate
gradients. It is rebuilt every :data:`REBUILD_EVERY` M-steps, from fresh logits of the atoms it was built
at, so that it is a function of ``(beta, W)`` alone: a checkpoint stores those two and a resumed fit
rebuilds the same factors (bit-exact resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import kernels
from .moments import Whitening

#: Tokens per component whose embeddings enter ``C_k`` exactly (the rest through ``Cov X``).
TOP_TOKENS = 2048
#: M-steps between rebuilds of the M-step's block preconditioner (a rebuild costs about ``top L^2 K``).
REBUILD_EVERY = 10
#: CG steps of the M-step with the block preconditioner (the diagonal one keeps ``cg_max_iter``).
BLOCK_CG_ITER = 3
#: The M-step's block preconditioner is used when its ``K L^2`` float64 factors take at most this share of
#: the bytes of the whole design ``X`` (all ranks' rows), or at most :data:`MEMORY_FLOOR` bytes; otherwise
#: the Newton-CG M-step keeps the diagonal preconditioner. 0 (both) turns the blocks off.
MEMORY_SHARE = 1 / 16
#: Factors this small are always affordable (about 32 MB: ``K L^2 <= 4M``, e.g. ``K = 8`` at ``L = 720``).
MEMORY_FLOOR = 32 * 2**20


def usable(design, K: int) -> bool:
    """Whether the M-step uses the block preconditioner for ``K`` components on ``design``.

    Decided from the whole design's size (``design.vocab_size``, the same on every rank), so that a fit
    over several ranks takes the same path as one process. Each rank holds the ``K`` factors of ``L x L``.
    """
    L = design.hidden_size
    budget = max(MEMORY_SHARE * design.vocab_size * L * design.X.element_size(), MEMORY_FLOOR)
    return MEMORY_SHARE > 0 and K * L * L * 8 <= budget


def exact(whitening: Whitening | None, top: int = TOP_TOKENS) -> bool:
    """Whether :func:`covariances` takes the exact ``p L^2 K`` pass (two passes over ``X``): no ``whitening``
    was given, or the whole vocabulary has at most ``4 top`` rows."""
    return whitening is None or whitening.n_rows <= 4 * top


def covariances(X, lg: Tensor, whitening: Whitening | None, dtype, chunk_size, comm, top: int = TOP_TOKENS) -> Tensor:
    """``C_k ~ Cov_{s_k}(X)`` ``(K, L, L)`` float64 for the component laws ``s_k = softmax(lg[:, k])``.

    ``lg (p, K)``: logits of this rank's rows. The tokens whose logit is at least the ``top``-th largest over
    the whole vocabulary enter exactly; the remaining mass ``tau_k`` is spread like the rows of ``X``
    (``tau_k (Cov X + (mu - m_k)(mu - m_k)^T)``, from the ``whitening``). Exact (a ``p L^2 K`` pass) when
    :func:`exact` says so. Over several ranks: the ranks' own top logits are gathered (``K x top`` numbers
    per rank) to find the threshold, then the selected tokens' mean and second moment are all-reduced
    (``K L`` and ``K L^2`` numbers), so every rank gets the factors one process would.
    """
    A = kernels.log_normalizer_from_logits(lg, comm)
    K = lg.shape[1]
    if exact(whitening, top):
        s = kernels.probs_from_logits(lg, A, dtype)
        m = kernels.allsum(kernels.weighted_sum(X, s, chunk_size=chunk_size), comm, "curvature_mean")
        return kernels.covariance(X, s, m, chunk_size, comm).to(torch.float64)
    local = torch.topk(lg, min(top, lg.shape[0]), dim=0).values  # (t, K)
    if comm is not None and comm.distributed:
        local = torch.cat(comm.gather(local.to(torch.float64), "curvature_top"))
    threshold = torch.topk(local, top, dim=0).values[-1]  # (K,) the top-th largest logit of each law
    picked = [torch.nonzero(lg[:, k] >= threshold[k]).squeeze(1) for k in range(K)]
    s = [torch.exp(lg[idx, k] - A[k]) for k, idx in enumerate(picked)]
    L = X.shape[1]
    first = torch.zeros(K, L + 1, dtype=torch.float64, device=lg.device)  # selected mean (unnormalised), mass
    for k in range(K):  # in slices of ``top`` rows: ties at the threshold (a flat law) may pick many more
        for idx, sk in zip(picked[k].split(top), s[k].split(top)):
            first[k, :L] += sk @ X.index_select(0, idx).to(torch.float64)
        first[k, L] = s[k].sum()
    first = kernels.allsum(first, comm, "curvature_mean")
    mu = whitening.mean.to(lg.device)
    tau = (1.0 - first[:, L]).clamp_min(0.0)
    m = first[:, :L] + tau[:, None] * mu
    out = torch.zeros(K, L, L, dtype=torch.float64, device=lg.device)
    for k in range(K):
        for idx, sk in zip(picked[k].split(top), s[k].split(top)):
            D = X.index_select(0, idx).to(torch.float64) - m[k]
            out[k].addmm_((D * sk[:, None]).T, D)
    out = kernels.allsum(out, comm, "curvature_cov")
    cov = whitening.covariance.to(lg.device)
    for k in range(K):  # in place, block by block: no second (K, L, L) tensor
        e = mu - m[k]
        out[k].add_(cov + torch.outer(e, e), alpha=float(tau[k]))
    return out


def cholesky_with_jitter(H: Tensor) -> Tensor:
    """Cholesky factors of the ``(K, L, L)`` symmetric blocks ``H``, written over ``H`` (returned).

    Block by block, so that no second ``(K, L, L)`` tensor is needed. A block that is not numerically
    positive definite (a component on one token, a tiny weight without ridge, rounding) gets the smallest of
    growing jitters ``j s_k I`` that makes it so (``s_k`` its mean diagonal, or the largest over the blocks
    when that is not positive), or ``sqrt(s_k) I`` if none does.
    """
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    diag = H.diagonal(dim1=1, dim2=2).mean(1)
    diag = torch.where(torch.isfinite(diag), diag, torch.zeros_like(diag))
    top = float(diag.max()) if diag.numel() else 1.0
    scale = torch.where(diag > 0, diag, torch.full_like(diag, top if top > 0 else 1.0))
    for k in range(H.shape[0]):
        chol, info = torch.linalg.cholesky_ex(H[k])
        for jitter in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
            if int(info) == 0:
                break
            chol, info = torch.linalg.cholesky_ex(H[k] + jitter * scale[k] * eye)
        H[k] = chol if int(info) == 0 else scale[k].sqrt() * eye
    return H


def factor_blocks(C: Tensor, weights: Tensor, ridge: float) -> Tensor:
    """Cholesky factors of ``weights_k C_k + ridge I`` (``ridge`` at least 1e-12), formed and factored in
    place over the ``(K, L, L)`` covariances ``C`` (returned)."""
    C.mul_(weights.to(C)[:, None, None]).diagonal(dim1=1, dim2=2).add_(max(ridge, 1e-12))
    return cholesky_with_jitter(C)


@dataclass
class BlockPreconditioner:
    """Factors of ``W_k C_k(beta_k) + lam I`` built at atoms ``beta (K, L)`` and weights ``W (K,)`` (float64);
    ``age``: M-steps since the build."""

    beta: Tensor
    W: Tensor
    chol: Tensor
    age: int = 0

    @classmethod
    def build(cls, X, beta: Tensor, W: Tensor, lam: float, bias, whitening, dtype, chunk_size, comm, age: int = 0):
        """One pass over ``X`` for fresh logits, then :func:`covariances` and the factors."""
        beta = beta.to(torch.float64)
        W = W.to(torch.float64)
        lg = kernels.logits(X, beta, bias, dtype=dtype, chunk_size=chunk_size)
        return cls(beta, W, factor_blocks(covariances(X, lg, whitening, dtype, chunk_size, comm), W, lam), age)

    def solve(self, V: Tensor) -> Tensor:
        """``(W_k C_k + lam I)^{-1} v_k`` for the rows of ``V (K, L)``."""
        K, L = V.shape
        return torch.cholesky_solve(V.to(torch.float64).reshape(K, L, 1), self.chol).reshape(K, L)

    def aged(self) -> BlockPreconditioner:
        return BlockPreconditioner(self.beta, self.W, self.chol, self.age + 1)

    @property
    def stale(self) -> bool:
        return self.age >= REBUILD_EVERY
