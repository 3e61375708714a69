"""Quasi-Newton polish of the marginal (observed-data) likelihood, after EM.

EM's rate is the fraction of missing information (docs/MATH.md §4). Where components share tokens — on LM
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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .data import TokenCounts
from .moments import Whitening
from .objective import marginal_objective

__all__ = ["PolishResult", "marginal_objective", "polish"]


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


class _Closure:
    """``-F / N`` and its gradient over ``theta = (whitened atoms, weight logits)``, for ``torch.optim.LBFGS``;
    remembers the best point evaluated and the best objective after each evaluation."""

    def __init__(self, X, counts, lam, bias, chunk_size, W: Tensor, K: int, on_iteration, comm, N: float) -> None:
        self.X, self.counts, self.lam, self.bias, self.chunk_size = X, counts, lam, bias, chunk_size
        self.comm, self.N = comm, N
        self.W, self.K, self.on_iteration = W, K, on_iteration
        self.best: dict = {}
        self.trace: list[float] = []
        self.n_evals = 0
        self.theta: Tensor | None = None
        self.opt: torch.optim.LBFGS | None = None

    def unpack(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``beta (K, L)`` and ``u (K,)`` from a flat ``theta``."""
        K, r = self.K, self.W.shape[1]
        return t[: K * r].reshape(K, r) @ self.W.T, t[K * r :]

    @torch.no_grad()
    def __call__(self) -> Tensor:
        theta, N = self.theta, self.N
        self.n_evals += 1
        b, u = self.unpack(theta)
        F, ll, g_beta, g_u = marginal_objective(
            self.X, self.counts, b, u, self.lam, self.bias, self.chunk_size, self.comm
        )
        theta.grad = -torch.cat([(g_beta @ self.W).flatten(), g_u]) / N
        if not self.best or F > self.best["F"]:
            self.best.update(F=F, ll=ll, theta=theta.detach().clone())
        self.trace.append(self.best["F"] / N)
        if self.on_iteration is not None:
            self.on_iteration(int(self.opt.state[theta].get("n_iter", 0)), self.best["F"] / N)
        return torch.tensor(-F / N, dtype=torch.float64)


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
    on_iteration: Callable[[int, float], None] | None = None,
    comm=None,
    n_tokens: float | None = None,
) -> PolishResult:
    """L-BFGS (strong Wolfe line search) on ``F / N`` from ``beta (K, L)``, ``log_alpha (K,)``.

    Stops after ``max_iter`` iterations or when an iteration changes the per-token objective by less than
    ``tol``. Returns the best point evaluated, so never one worse than the first: the start with its atoms
    projected on the directions the whitening keeps (all of them for a full-rank design; dropped ones
    carry less than 1e-8 of the largest variance). :class:`~torch_softmix.em.EMFitter` keeps the result
    only if it beats EM's own final objective. ``on_iteration(n_iter, best_objective_per_token)`` is called
    after each function evaluation (progress bars). With a ``comm`` over several ranks, ``X`` and ``counts``
    are this rank's rows and ``n_tokens`` the total over all ranks; every rank runs the same L-BFGS on the
    same all-reduced objective.
    """
    dev = X.device
    gamma0 = beta.to(device=dev, dtype=torch.float64) @ whitening.W_inv.to(dev).T  # (K, r)
    u0 = log_alpha.to(device=dev, dtype=torch.float64).clamp_min(-50.0)  # a collapsed component: finite
    N = counts.total if n_tokens is None else n_tokens
    W = whitening.W.to(dev)
    closure = _Closure(X, counts, lam, bias, chunk_size, W, gamma0.shape[0], on_iteration, comm, N)
    closure.theta = torch.cat([gamma0.flatten(), u0]).requires_grad_(True)
    max_eval = int(max_iter * 1.25) + 10
    closure.opt = torch.optim.LBFGS(
        [closure.theta],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_eval,
        history_size=history_size,
        tolerance_grad=0.0,
        tolerance_change=tol,
        line_search_fn="strong_wolfe",
    )
    closure.opt.step(closure)
    n_iter = int(closure.opt.state[closure.theta].get("n_iter", 0))
    b, u = closure.unpack(closure.best["theta"])
    return PolishResult(
        beta=b,
        log_alpha=torch.log_softmax(u, 0),
        objective=closure.best["F"] / N,
        loglik=closure.best["ll"] / N,
        trace=closure.trace,
        n_evals=closure.n_evals,
        n_iter=n_iter,
        converged=n_iter < max_iter and closure.n_evals < max_eval,
    )
