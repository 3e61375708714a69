"""Quasi-Newton polish of the marginal (observed-data) likelihood, after EM.

EM's rate is the fraction of missing information (MATH.md §3). Where components share tokens — on LM
next-token mixtures, a function word such as " the" carried by two prompts' laws — that fraction is close
to one along a few directions and EM creeps: thousands of iterations, each gaining ~1e-6 nats per token.
L-BFGS on the penalised marginal objective

    F(beta, u) = sum_j n_j log sum_k alpha_k softmax(X beta_k + b)_j - (lam / 2) |beta|^2,
    alpha = softmax(u),

whose gradient is the E-step's statistics,

    dF/dbeta_k = S1_k - W_k m(beta_k) - lam beta_k,        dF/du_k = W_k - N alpha_k,

builds curvature along those directions from successive gradients and moves along them in a few
hundred evaluations (two passes over ``X`` each). Atoms are optimised in whitened coordinates
(``beta = gamma W^T``, :class:`~torch_softmix.moments.Whitening`), which equalises the scales of the
embedding's directions. Everything is float64 (the design is read chunk by chunk): a float32 objective
is too coarse for a line search at gains of 1e-7 per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import kernels
from .data import TokenCounts
from .moments import Whitening


@dataclass
class PolishResult:
    """``beta (K, L)``, ``log_alpha (K,)`` float64; per-token ``objective`` and ``loglik``; the best per-token
    objective after each function evaluation (``trace``), the number of evaluations, L-BFGS iterations, and
    whether it stopped on the tolerance (not on ``max_iter``)."""

    beta: Tensor
    log_alpha: Tensor
    objective: float
    loglik: float
    trace: list[float] = field(default_factory=list)
    n_evals: int = 0
    n_iter: int = 0
    converged: bool = False


def marginal_objective(
    X: Tensor,
    counts: TokenCounts,
    beta: Tensor,
    u: Tensor,
    lam: float,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[float, float, Tensor, Tensor]:
    """``F`` (penalised, total), the log-likelihood (total) and the gradients ``dF/dbeta (K, L)``,
    ``dF/du (K,)`` at atoms ``beta (K, L)`` and weight logits ``u (K,)`` (``alpha = softmax(u)``), float64.

    Two passes over ``X``: the logits and the softmax means ``m(beta_k)``; the E-step runs on the support.
    """
    lg = kernels.logits(X, beta, bias, dtype=torch.float64, chunk_size=chunk_size)  # (p, K)
    A = kernels.log_normalizer_from_logits(lg)
    log_alpha = torch.log_softmax(u, 0)
    stats = kernels.e_step_from_logits(
        X, lg.index_select(0, counts.support), log_alpha, A, counts.support, counts.values, torch.float64, chunk_size
    )
    m = kernels.weighted_sum(X, kernels.probs_from_logits(lg, A, torch.float64), chunk_size=chunk_size)
    F = float(stats.loglik) - 0.5 * lam * float((beta * beta).sum())
    g_beta = stats.S1 - stats.W[:, None] * m - lam * beta
    g_u = stats.W - counts.total * log_alpha.exp()
    return F, float(stats.loglik), g_beta, g_u


def polish(
    X: Tensor,
    counts: TokenCounts,
    beta: Tensor,
    log_alpha: Tensor,
    lam: float,
    whitening: Whitening,
    *,
    bias: Tensor | None = None,
    max_iter: int = 300,
    tol: float = 1e-10,
    history_size: int = 30,
    chunk_size: int | None = None,
) -> PolishResult:
    """L-BFGS (strong Wolfe line search) on ``F / N`` from ``beta (K, L)``, ``log_alpha (K,)``.

    Stops after ``max_iter`` iterations or when an iteration changes the per-token objective by less than
    ``tol``. Returns the best point evaluated, so never one worse than the first: the start with its atoms
    projected on the directions the whitening keeps (all of them for a full-rank design; dropped ones
    carry less than 1e-8 of the largest variance). :class:`~torch_softmix.em.EMFitter` keeps the result
    only if it beats EM's own final objective.
    """
    N = counts.total
    dev = X.device
    W = whitening.W.to(dev)  # (L, r)
    gamma0 = beta.to(device=dev, dtype=torch.float64) @ whitening.W_inv.to(dev).T  # (K, r)
    u0 = log_alpha.to(device=dev, dtype=torch.float64).clamp_min(-50.0)  # a collapsed component: finite
    theta = torch.cat([gamma0.flatten(), u0]).requires_grad_(True)
    K, r = gamma0.shape

    def unpack(t: Tensor) -> tuple[Tensor, Tensor]:
        return t[: K * r].reshape(K, r) @ W.T, t[K * r :]

    best: dict = {}
    trace: list[float] = []
    n_evals = 0

    def closure() -> Tensor:
        nonlocal n_evals
        n_evals += 1
        with torch.no_grad():
            b, u = unpack(theta)
            F, ll, g_beta, g_u = marginal_objective(X, counts, b, u, lam, bias, chunk_size)
            theta.grad = -torch.cat([(g_beta @ W).flatten(), g_u]) / N
            if not best or F > best["F"]:
                best.update(F=F, ll=ll, theta=theta.detach().clone())
            trace.append(best["F"] / N)
        return torch.tensor(-F / N, dtype=torch.float64)

    max_eval = int(max_iter * 1.25) + 10
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_eval,
        history_size=history_size,
        tolerance_grad=0.0,
        tolerance_change=tol,
        line_search_fn="strong_wolfe",
    )
    opt.step(closure)
    n_iter = int(opt.state[theta].get("n_iter", 0))
    b, u = unpack(best["theta"])
    converged = n_iter < max_iter and n_evals < max_eval
    return PolishResult(
        beta=b,
        log_alpha=torch.log_softmax(u, 0),
        objective=best["F"] / N,
        loglik=best["ll"] / N,
        trace=trace,
        n_evals=n_evals,
        n_iter=n_iter,
        converged=converged,
    )
