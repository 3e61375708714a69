"""The objective the fit maximises, its gradient, and the criteria built on it (docs/MATH.md §3, §6).

One home for each formula:

* the ridge penalty ``(lam / 2) sum_k |beta_k|^2`` and the penalised objective per token
  ``F / N = loglik / N - (lam / 2N) |beta|^2`` (``lam = ridge * N``), used by EM, the L-BFGS phase
  and every comparison between them;
* the atom gradient ``S1_k - W_k m(beta_k) - lam beta_k``, which is both the M-step's gradient and the
  gradient of ``F`` itself (Fisher's identity) when ``W, S1`` are the E-step's statistics;
* the marginal objective with its gradients, evaluated from scratch in float64 (the L-BFGS phase);
* the number of free parameters and BIC / AIC.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import kernels
from .data import TokenCounts


def penalty(beta: Tensor, lam: float) -> float:
    """``(lam / 2) sum_k |beta_k|^2`` in float64."""
    b = beta.detach().to(torch.float64)
    return 0.5 * lam * float((b * b).sum())


def per_token_objective(loglik: float, beta: Tensor, lam: float, n_tokens: float) -> float:
    """``F / N = (loglik - penalty) / N``: the quantity the fit never decreases, reported per token."""
    return (float(loglik) - penalty(beta, lam)) / n_tokens


def atom_gradient(beta: Tensor, m: Tensor, W: Tensor, S1: Tensor, lam: float) -> Tensor:
    """``g_k = S1_k - W_k m(beta_k) - lam beta_k``: ``(K, L)`` float64."""
    b = beta.to(torch.float64)
    return S1.to(torch.float64) - W.to(torch.float64)[:, None] * m.to(torch.float64) - lam * b


def weight_gradient(W: Tensor, log_alpha: Tensor, n_tokens: float) -> Tensor:
    """``dF/du_k = W_k - N alpha_k`` for weight logits ``u`` (``alpha = softmax(u)``): ``(K,)`` float64."""
    return W.to(torch.float64) - n_tokens * log_alpha.to(torch.float64).exp()


def marginal_objective(
    X: Tensor,
    counts: TokenCounts,
    beta: Tensor,
    u: Tensor,
    lam: float,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    comm=None,
) -> tuple[float, float, Tensor, Tensor]:
    """``F`` (penalised, total), the log-likelihood (total) and the gradients ``dF/dbeta (K, L)`` and
    ``dF/du (K,)`` at atoms ``beta (K, L)`` and weight logits ``u (K,)``, all in float64.

    Two passes over ``X``: the logits, then the softmax means ``m(beta_k)`` together with the E-step's statistics
    where the support covers much of the vocabulary (:func:`~torch_softmix.kernels.fuse_pays`; else those come
    from a product over the support's rows). With a ``comm`` over several ranks, ``X`` and ``counts`` are this
    rank's rows and the sums are all-reduced (``A``, then the statistics, ``m`` and ``N`` together).
    """
    lg = kernels.logits(X, beta, bias, dtype=torch.float64, chunk_size=chunk_size)  # (p, K)
    A = kernels.log_normalizer_from_logits(lg, comm)
    log_alpha = torch.log_softmax(u, 0)
    sup, n = counts.support, counts.values
    if kernels.fuse_pays(sup.numel(), X.shape[0], X.shape[1]):  # each rank decides for itself: the wire is the same either way
        stats = kernels.e_step_with_mean(X, lg, log_alpha, A, sup, n, torch.float64, chunk_size)
        m = stats.mean
    else:
        stats = kernels.e_step_from_logits(X, lg.index_select(0, sup), log_alpha, A, sup, n, torch.float64, chunk_size)
        m = kernels.weighted_sum(X, kernels.probs_from_logits(lg, A, torch.float64), chunk_size=chunk_size)
    N = counts.total
    if comm is not None and comm.distributed:
        K, L = m.shape
        local = [m.flatten(), stats.loglik.reshape(1), stats.W, stats.S1.flatten(), stats.loglik.new_tensor([N])]
        packed = comm.sum(torch.cat(local), "marginal")
        m, rest = packed[: K * L].view(K, L), packed[K * L :]
        stats = kernels.EStepStats(rest[0], rest[1 : K + 1], rest[K + 1 : K + 1 + K * L].view(K, L))
        N = float(rest[-1])
    F = float(stats.loglik) - penalty(beta, lam)
    g_beta = atom_gradient(beta, m, stats.W, stats.S1, lam)
    return F, float(stats.loglik), g_beta, weight_gradient(stats.W, log_alpha, N)


def n_parameters(n_components: int, hidden_size: int) -> int:
    """Free parameters of a ``K``-component mixture in ``R^L``: ``K (L + 1) - 1``."""
    return n_components * (hidden_size + 1) - 1


def information_criteria(loglik: float, n_components: int, hidden_size: int, n_tokens: float) -> dict[str, float]:
    """BIC and AIC from a total log-likelihood (lower is better)."""
    k = n_parameters(n_components, hidden_size)
    return {"bic": -2 * loglik + k * math.log(n_tokens), "aic": -2 * loglik + 2 * k}
