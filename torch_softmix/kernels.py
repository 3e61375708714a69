"""Chunked passes over the design: where the formulas of docs/MATH.md §1–§3 are evaluated.

Every pass walks the vocabulary (the ``p`` rows of ``X``) in chunks, casting one chunk at a time
to the compute dtype (so a half-precision embedding is never copied whole), and nothing of size
``K × p × L`` is ever built: the largest objects are ``(p, K)`` (logits, weights) and one chunk.
Logits, log-normalisers and likelihoods are kept in float64.

Names follow docs/MATH.md: ``X (p, L)``, ``b (p,)``, ``beta (K, L)``, ``log_alpha (K,)``, ``A(beta) (K,)``,
``s_k = softmax(X beta_k + b)``, ``m(beta) = X^T s (K, L)``, ``C(beta) = X^T diag(s) X - m m^T (K, L, L)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dist import Comm

#: Default budget, in elements, for the largest per-chunk temporary.
CHUNK_ELEMENTS = 1 << 20
#: The same on a GPU, where each chunk costs kernel launches: 2^26 elements (256 MiB in float32).
CHUNK_ELEMENTS_CUDA = 1 << 26
#: The collectives of a single process (none): where no ``comm`` is given.
_ONE_RANK = Comm()
#: Where the counts' support holds at least this share of the rows, the E-step's statistics and the softmax means
#: at the same atoms are formed in one pass over all rows (:func:`e_step_with_mean`) rather than one over the
#: support's rows and another over all rows (:func:`fuse_pays`).
FUSE_MIN_SUPPORT = 0.5
#: ... and where the design has at least this many columns. On narrower designs the product is cheap next to the
#: elementwise work on the ``(p, K)`` logits, which the fused pass does for ``2K`` columns over all rows:
#: ``benchmarks/bench_fused_estep.py`` measured it slower at ``L`` in {16, 32, 64} (time to target, separate /
#: fused, median 0.80-0.88 on CPU) and even, within noise, at ``L`` in {192, 576}.
FUSE_MIN_WIDTH = 128
#: Passes over ``X`` since the last reset (a pass over ``r`` of the ``p`` rows counts ``r / p``): benchmarks read it.
PASSES = [0.0]


def chunk_rows(n_rows: int, width: int, chunk_size: int | None = None, device: torch.device | None = None) -> int:
    """Rows per chunk so that a ``(rows, width)`` temporary stays within the budget of ``device``."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    budget = CHUNK_ELEMENTS_CUDA if device is not None and device.type == "cuda" else CHUNK_ELEMENTS
    return max(1, min(max(n_rows, 1), budget // max(1, width)))


def row_chunks(X: Tensor, rows: Tensor | None, dtype: torch.dtype, chunk_size: int | None):
    """Yield ``(start, stop, X_chunk)`` over the rows of ``X`` (or ``X[rows]``), cast to ``dtype``."""
    n = X.shape[0] if rows is None else rows.numel()
    PASSES[0] += n / max(1, X.shape[0])
    step = chunk_rows(n, X.shape[1], chunk_size, X.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        Xc = X[start:stop] if rows is None else X.index_select(0, rows[start:stop])
        yield start, stop, Xc.to(dtype)


def project(X: Tensor, V: Tensor, rows: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """``X[rows] @ V^T``: ``(r, K)`` in ``V.dtype`` for ``V (K, L)`` (all ``p`` rows when ``rows`` is None).

    Differentiable in ``V``.
    """
    parts = [Xc @ V.T for _, _, Xc in row_chunks(X, rows, V.dtype, chunk_size)]
    return torch.cat(parts) if parts else V.new_zeros(0, V.shape[0])


def weighted_sum(X: Tensor, G: Tensor, rows: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """``G^T @ X[rows]``: ``(K, L)`` in ``G.dtype`` for weights ``G (r, K)``."""
    out = torch.zeros(G.shape[1], X.shape[1], dtype=G.dtype, device=G.device)
    for start, stop, Xc in row_chunks(X, rows, G.dtype, chunk_size):
        out.addmm_(G[start:stop].T, Xc)
    return out


def logits(
    X: Tensor,
    beta: Tensor,
    bias: Tensor | None = None,
    rows: Tensor | None = None,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``x_j . beta_k + b_j`` for tokens ``rows`` (all when None): ``(r, K)`` float64.

    The products run in ``dtype`` (default ``beta.dtype``); the result is stored in float64.
    Differentiable in ``beta``.
    """
    dt = dtype or beta.dtype
    out = project(X, beta.to(dt), rows, chunk_size).to(torch.float64)
    if bias is not None:
        b = bias if rows is None else bias.index_select(0, rows)
        out = out + b.to(torch.float64)[:, None]
    return out


def log_normalizer_from_logits(logits_all: Tensor, comm=None) -> Tensor:
    """``A_k = logsumexp_j logits_jk`` from the ``(p, K)`` logits: ``(K,)`` float64.

    With a :class:`~torch_softmix.dist.Comm` over several ranks, ``logits_all`` holds this rank's rows and
    the result is the log-normaliser over the whole vocabulary (two all-reduces of ``K`` numbers).
    """
    return (comm if comm is not None else _ONE_RANK).logsumexp(logits_all, dim=0, name="A")


def probs_from_logits(logits_all: Tensor, A: Tensor, dtype: torch.dtype) -> Tensor:
    """``s_jk = exp(logits_jk - A_k)``: ``(p, K)`` in ``dtype``."""
    return torch.exp(logits_all - A).to(dtype)


def allsum(t: Tensor, comm, name: str) -> Tensor:
    """Complete a sum over the vocabulary across ranks: ``comm.sum`` when ``comm`` spans several ranks, else
    ``t`` itself (the one place the fit decides whether a sum needs communication)."""
    return comm.sum(t, name) if comm is not None and comm.distributed else t


def covariance(X: Tensor, s: Tensor, m: Tensor, chunk_size: int | None = None, comm=None) -> Tensor:
    """``C_k = X^T diag(s_k) X - m_k m_k^T`` for ``s (p, K)``, ``m (K, L)``: ``(K, L, L)``. Costs ``O(p L^2 K)``.

    With a ``comm``, ``X`` and ``s`` are this rank's rows and ``m`` the global mean: the second moment is
    all-reduced before ``m m^T`` is subtracted (once).
    """
    K, L = m.shape
    C = torch.zeros(K, L, L, dtype=s.dtype, device=s.device)
    for start, stop, Xc in row_chunks(X, None, s.dtype, chunk_size):
        for k in range(K):
            C[k].addmm_(Xc.T, Xc * s[start:stop, k : k + 1])
    C = allsum(C, comm, "hessian")
    C -= m[:, :, None] * m[:, None, :]
    return 0.5 * (C + C.transpose(1, 2))


def covariance_diagonal(X: Tensor, s: Tensor, m: Tensor, chunk_size: int | None = None, comm=None) -> Tensor:
    """``diag C_k = s_k^T (X o X) - m_k^2``: ``(K, L)`` (the sum all-reduced with a ``comm``)."""
    out = torch.zeros_like(m)
    for start, stop, Xc in row_chunks(X, None, s.dtype, chunk_size):
        out.addmm_(s[start:stop].T, Xc * Xc)
    return (allsum(out, comm, "cg_diag") - m * m).clamp_min(0)


def covariance_matvec(
    X: Tensor, s: Tensor, m: Tensor, V: Tensor, chunk_size: int | None = None, comm=None
) -> Tensor:
    """``C_k v_k = X^T (s_k * (X v_k)) - m_k (m_k . v_k)`` for every ``k``: ``(K, L)``.

    Two products over ``X`` per call and no ``L x L`` matrix (docs/MATH.md §3, Newton-CG); with a ``comm``
    one all-reduce of ``K L`` numbers.
    """
    out = torch.zeros_like(V)
    for start, stop, Xc in row_chunks(X, None, V.dtype, chunk_size):
        out.addmm_((s[start:stop] * (Xc @ V.T)).T, Xc)
    return allsum(out, comm, "cg_matvec") - m * (m * V).sum(1, keepdim=True)


@dataclass
class SoftmaxMoments:
    """``A (K,)`` float64 log-normalisers, ``m (K, L)`` means and (``order=2``) ``C (K, L, L)``."""

    A: Tensor
    m: Tensor | None = None
    C: Tensor | None = None


def softmax_moments(
    X: Tensor, beta: Tensor, bias: Tensor | None = None, order: int = 0, chunk_size: int | None = None
) -> SoftmaxMoments:
    """The moments of the component laws ``s_k = softmax(X beta_k + b)`` up to ``order`` (0, 1 or 2)."""
    lg = logits(X, beta, bias, chunk_size=chunk_size)
    A = log_normalizer_from_logits(lg)
    if order == 0:
        return SoftmaxMoments(A)
    s = probs_from_logits(lg, A, beta.dtype)
    m = weighted_sum(X, s, chunk_size=chunk_size)
    C = covariance(X, s, m, chunk_size) if order >= 2 else None
    return SoftmaxMoments(A, m, C)


def log_normalizer(X: Tensor, beta: Tensor, bias: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """``A(beta_k) = logsumexp_j (x_j . beta_k + b_j)``: ``(K,)`` float64."""
    return softmax_moments(X, beta, bias, order=0, chunk_size=chunk_size).A


@dataclass
class EStepStats:
    """Sufficient statistics of one E-step (docs/MATH.md §3).

    ``loglik`` float64 scalar ``sum_j n_j log pi_j``; ``W (K,)`` float64 ``sum_j n_j gamma_jk``;
    ``S1 (K, L)`` ``sum_j n_j gamma_jk x_j`` (so ``mu_k = S1_k / W_k``). ``mean (K, L)``: the softmax means
    ``m_k = sum_j s_jk x_j`` at the same atoms when :func:`e_step_with_mean` formed them in the same pass (the
    M-step's first gradient needs them), else ``None``.
    """

    loglik: Tensor
    W: Tensor
    S1: Tensor
    mean: Tensor | None = None


def _responsibilities(logits_support: Tensor, log_alpha: Tensor, A: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum_j n_j log pi_j, n_j gamma_jk (S, K))`` from the support's logits ``(S, K)`` float64."""
    joint = logits_support + (log_alpha.to(torch.float64) - A.to(torch.float64))  # log alpha_k s_k(j)
    log_pi = torch.logsumexp(joint, dim=1)
    return (n * log_pi).sum(), n[:, None] * torch.exp(joint - log_pi[:, None])


def e_step_from_logits(
    X: Tensor,
    logits_support: Tensor,
    log_alpha: Tensor,
    A: Tensor,
    support: Tensor,
    n: Tensor,
    dtype: torch.dtype,
    chunk_size: int | None = None,
) -> EStepStats:
    """The E-step on the support ``S`` of the counts, reduced to sufficient statistics.

    ``log gamma_jk = log_alpha_k + x_j . beta_k + b_j - A(beta_k) - log pi_j`` for ``j`` in
    ``support (S,)`` with counts ``n (S,)``, from the support's logits ``(S, K)`` float64.
    ``S1`` is formed in ``dtype`` with one product over the support's rows.
    """
    loglik, ngamma = _responsibilities(logits_support, log_alpha, A, n)
    S1 = weighted_sum(X, ngamma.to(dtype), rows=support, chunk_size=chunk_size)
    return EStepStats(loglik, ngamma.sum(0), S1)


def fuse_pays(n_support: float, n_rows: float, width: int) -> bool:
    """Whether :func:`e_step_with_mean` (one pass over all ``n_rows``) beats the separate products (``n_support``
    rows, then all rows): where the support holds at least :data:`FUSE_MIN_SUPPORT` of the rows and the design's
    ``width`` (``L``) is at least :data:`FUSE_MIN_WIDTH`."""
    return width >= FUSE_MIN_WIDTH and n_support >= FUSE_MIN_SUPPORT * n_rows


def e_step_with_mean(
    X: Tensor,
    logits_all: Tensor,
    log_alpha: Tensor,
    A: Tensor,
    support: Tensor,
    n: Tensor,
    dtype: torch.dtype,
    chunk_size: int | None = None,
) -> EStepStats:
    """:func:`e_step_from_logits` and the softmax means ``m_k = sum_j s_jk x_j`` at the same atoms, from the full
    logits ``(p, K)`` float64, in ONE pass over all rows of ``X`` (weights ``[s | n gamma]``, ``2K`` columns,
    formed one chunk of rows at a time).

    Reading ``X`` once instead of twice (the support's rows, then all rows for the M-step's gradient) is the
    saving where the support covers much of the vocabulary; where it is a small share, the separate products
    cost less (:func:`fuse_pays`).
    """
    loglik, ngamma = _responsibilities(logits_all.index_select(0, support), log_alpha, A, n)
    p, K = logits_all.shape
    ng = ngamma.to(dtype)
    # the weights are built chunk by chunk (no (p, 2K) tensor): the support is sorted, so each chunk's share
    # of it is a slice, found for all chunks at once
    step = chunk_rows(p, X.shape[1], chunk_size, X.device)
    edges = torch.arange(0, p + step, step, device=support.device).clamp_max(p)
    cuts = torch.searchsorted(support, edges).tolist()
    both = torch.zeros(2 * K, X.shape[1], dtype=dtype, device=X.device)
    for i, (start, stop, Xc) in enumerate(row_chunks(X, None, dtype, chunk_size)):
        G = torch.zeros(stop - start, 2 * K, dtype=dtype, device=X.device)
        G[:, :K] = probs_from_logits(logits_all[start:stop], A, dtype)
        a, b = cuts[i], cuts[i + 1]
        G[:, K:].index_copy_(0, support[a:b] - start, ng[a:b])
        both.addmm_(G.T, Xc)
    return EStepStats(loglik, ngamma.sum(0), both[K:], both[:K])


def reduce_stats(stats: EStepStats, comm=None) -> EStepStats:
    """The statistics of the whole vocabulary from each rank's: one all-reduce of ``1 + K + K L`` numbers
    (``K L`` more with the softmax means)."""
    if comm is None or not comm.distributed:
        return stats
    K, L = stats.S1.shape
    parts = [stats.loglik.reshape(1), stats.W, stats.S1.to(torch.float64).flatten()]
    if stats.mean is not None:
        parts.append(stats.mean.to(torch.float64).flatten())
    packed = comm.sum(torch.cat(parts), "e_step")
    S1 = packed[K + 1 : K + 1 + K * L].view(K, L).to(stats.S1.dtype)
    mean = None if stats.mean is None else packed[K + 1 + K * L :].view(K, L).to(stats.mean.dtype)
    return EStepStats(packed[0], packed[1 : K + 1], S1, mean)


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
    """:func:`e_step_from_logits` with the support's logits computed from ``beta (K, L)``."""
    lg = logits(X, beta, bias, rows=support, chunk_size=chunk_size)
    return e_step_from_logits(X, lg, log_alpha, A, support, n, beta.dtype, chunk_size)


def first_row(X: Tensor, dtype: torch.dtype, comm=None) -> Tensor:
    """Row 0 of the whole design (rank 0's first row when the rows are shared among ranks), in ``dtype``."""
    row = X[0].to(dtype) if X.shape[0] else torch.zeros(X.shape[1], dtype=dtype, device=X.device)
    return comm.broadcast(row.clone(), name="first_row") if comm is not None and comm.distributed else row


def column_moments(X: Tensor, chunk_size: int | None = None, comm=None) -> tuple[Tensor, Tensor]:
    """Per-column mean and variance of the rows of ``X (p, L)``: two ``(L,)`` float64, one chunked pass.

    Chunks are read in float32 (float64 designs stay float64), summed per chunk in that dtype and
    accumulated in float64 about the first row: the temporaries stay one chunk, and there is no
    cancellation when ``|mean| >> spread``. With a ``comm`` over several ranks, ``X`` is this rank's rows
    and the moments are those of the whole design.
    """
    L = X.shape[1]
    dt = torch.float64 if X.dtype == torch.float64 else torch.float32
    shift = first_row(X, dt, comm)
    s = torch.zeros(2 * L + 1, dtype=torch.float64, device=X.device)
    for _, _, Xc in row_chunks(X, None, dt, chunk_size):
        D = Xc - shift
        s[:L] += D.sum(0).to(torch.float64)  # per-chunk sums in the chunk's dtype, accumulated in float64
        s[L : 2 * L] += D.square_().sum(0).to(torch.float64)
    s[2 * L] = X.shape[0]
    if comm is not None:
        comm.sum(s, "column_moments")
    p = float(s[2 * L])
    mean = s[:L] / p
    return mean + shift.to(torch.float64), (s[L : 2 * L] / p - mean * mean).clamp_min(0)


def column_mean(X: Tensor, chunk_size: int | None = None, comm=None) -> Tensor:
    """The mean row of ``X``: ``(L,)`` float64."""
    return column_moments(X, chunk_size, comm)[0]


def column_variance(X: Tensor, chunk_size: int | None = None, comm=None) -> Tensor:
    """Per-column variance of the rows of ``X``: ``(L,)`` float64."""
    return column_moments(X, chunk_size, comm)[1]
