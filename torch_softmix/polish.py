"""Quasi-Newton phase on the marginal (observed-data) likelihood (docs/MATH.md §4).

EM's rate is the fraction of missing information. Where components share tokens (LM next-token
mixtures: a function word carried by two prompts' laws) that fraction is close to one along a few
directions and EM creeps. L-BFGS on the penalised marginal objective

    F(beta, u) = sum_j n_j log sum_k alpha_k softmax(X beta_k + b)_j - (lam / 2) |beta|^2,   alpha = softmax(u),

whose gradient is the E-step's statistics (``dF/dbeta_k = X^T (n gamma_k - W_k s_k) - lam beta_k``,
``dF/du_k = W_k - N alpha_k``), builds curvature along those directions from successive gradients.

What makes an iteration cost **two passes over X** (and no more):

* the logits ``X beta^T + b`` ``(p, K)`` are kept, in float64; along a direction ``D`` one pass gives
  ``X D^T`` and every trial step ``t`` of the line search is ``logits + t X D^T``: objective and slope
  cost ``O((p + S) K)``, not a pass, so the line search is accurate for free;
* the gradient at the accepted point is the second pass, ``X^T G``.

Passes run in the problem's compute dtype (float32 for float32 designs); the kept logits, the objective,
every reduction and the line search are float64, and the logits are recomputed from scratch in float64
every ``refresh`` iterations and at the end (the increments' float32 rounding never accumulates).

The initial inverse Hessian of every L-BFGS step (``precondition=True``, the default) is the inverse of the
complete-data information, block by block: ``(alpha_k C_k + ridge I)^{-1}`` for atom ``k``, with ``C_k`` the
covariance of the embeddings under component ``k``'s law, and ``1 / alpha_k`` for the weights' logits. It is
what EM's Newton M-step inverts; L-BFGS then only has to learn the coupling between components (the
missing information), a few directions. On LM designs the laws are peaked, ``C_k`` has a handful of large
eigenvalues and hundreds near the ridge, and without it L-BFGS crawls along those flat directions for
thousands of iterations. ``C_k`` is built from each law's most probable tokens exactly and the rest of its
mass through ``Cov X`` (``O(top L^2 K)``, not a ``p L^2 K`` pass), and rebuilt every ``precondition_every``
iterations. Without preconditioning, atoms are optimised in whitened coordinates (``beta = gamma W^T``) with
the initial inverse Hessian scaled per component by ``1 / alpha_k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import curvature, kernels
from .data import TokenCounts
from .head import _param_dtype
from .moments import Whitening
from .objective import marginal_objective, penalty

__all__ = ["PolishResult", "marginal_objective", "polish"]

#: Wolfe constants of the line search (sufficient decrease, curvature).
C1, C2 = 1e-4, 0.9
#: Convergence: the last this-many iterations gained less than ``tol`` per token each on average
#: (single L-BFGS iterations can gain little before a large one).
STALL_ITERS = 10
#: A polish run toward a ``target`` gives up once the target lies more than this many times beyond what the run
#: would reach at its recent pace kept for all its iterations left (:func:`out_of_reach`).
GIVE_UP_MARGIN = 1.0
#: Smallest weight used in the per-component scaling (a collapsed component must not get an infinite step).
MIN_SCALE_WEIGHT = 1e-4


@dataclass
class PolishResult:
    """``beta (K, L)``, ``log_alpha (K,)`` float64; per-token ``objective`` and ``loglik``; the objective after
    each iteration (``trace``), objective evaluations (line-search trials), iterations, passes over ``X``,
    whether it stopped on the tolerance (not on ``max_iter``), and whether it gave up on its ``target``."""

    beta: Tensor
    log_alpha: Tensor
    objective: float
    loglik: float
    trace: list[float] = field(default_factory=list)
    n_evals: int = 0
    n_iter: int = 0
    n_passes: int = 0
    converged: bool = False
    gave_up: bool = False


@dataclass
class _Point:
    """Everything at one point that comes from the kept logits: ``-F / N`` (minimised), the log-likelihood,
    ``W (K,)``, the gradient weights ``G (p, K)`` and, along a direction, the slope."""

    f: float
    loglik: float
    W: Tensor
    G: Tensor
    slope: float = math.nan


class _Marginal:
    """The objective on kept logits, its slope along ``X D^T`` and its gradient (one pass)."""

    def __init__(self, X, counts: TokenCounts, lam, bias, chunk_size, comm, N, dtype, W_white: Tensor) -> None:
        self.X, self.counts, self.lam, self.bias, self.chunk_size = X, counts, lam, bias, chunk_size
        self.comm, self.N, self.dtype, self.Wh = comm, N, dtype, W_white
        self.n_passes = 0
        self.n_evals = 0

    def logits(self, beta: Tensor) -> Tensor:
        """``X beta^T + b`` computed from scratch in float64 (one pass)."""
        self.n_passes += 1
        return kernels.logits(self.X, beta, self.bias, dtype=torch.float64, chunk_size=self.chunk_size)

    def along(self, D: Tensor) -> Tensor:
        """``X D^T`` ``(p, K)`` for a direction ``D (K, L)`` (one pass in the compute dtype), stored in float64."""
        self.n_passes += 1
        return kernels.project(self.X, D.to(self.dtype), chunk_size=self.chunk_size).to(torch.float64)

    def at(self, lg: Tensor, beta: Tensor, u: Tensor, XD: Tensor | None = None, D=None, du=None) -> _Point:
        """The point with logits ``lg (p, K)``; with ``XD``, ``D``, ``du`` also the slope of ``-F/N`` along them."""
        self.n_evals += 1
        sup, n = self.counts.support, self.counts.values
        log_s = lg - kernels.log_normalizer_from_logits(lg, self.comm)
        log_alpha = torch.log_softmax(u, 0)
        joint = log_s.index_select(0, sup) + log_alpha
        log_pi = torch.logsumexp(joint, dim=1)
        ngamma = n[:, None] * torch.exp(joint - log_pi[:, None])  # (S, K)
        s = log_s.exp_()  # (p, K), in place: log_s is not needed again
        parts = [(n * log_pi).sum().reshape(1), ngamma.sum(0)]
        if XD is not None:
            parts += [(ngamma * XD.index_select(0, sup)).sum(0), (s * XD).sum(0)]
        sums = kernels.allsum(torch.cat(parts), self.comm, "marginal")
        K = u.shape[0]
        ll, W = float(sums[0]), sums[1 : K + 1]
        G = s.mul_(-W).index_add_(0, sup, ngamma)  # n gamma - W s, (p, K)
        F = ll - penalty(beta, self.lam)
        slope = math.nan
        if XD is not None:
            a, b = sums[K + 1 : 2 * K + 1], sums[2 * K + 1 :]
            dF = float((a - W * b).sum()) - self.lam * float((beta * D).sum())
            dF += float(((W - self.N * log_alpha.exp()) * du).sum())
            slope = -dF / self.N
        return _Point(-F / self.N, ll, W, G, slope)

    def gradient(self, point: _Point, beta: Tensor, u: Tensor) -> Tensor:
        """The gradient of ``-F/N`` in ``theta = (gamma, u)``: one pass ``X^T G``."""
        self.n_passes += 1
        g_beta = kernels.allsum(kernels.weighted_sum(self.X, point.G.to(self.dtype), chunk_size=self.chunk_size),
                                self.comm, "gradient").to(torch.float64) - self.lam * beta
        g_u = point.W - self.N * torch.softmax(u, 0)
        return -torch.cat([(g_beta @ self.Wh).flatten(), g_u]) / self.N


def _max_abs(t: Tensor, comm) -> Tensor:
    """``max |t|`` over this rank's rows, or over all ranks' with a ``comm`` (one all-reduce of one number)."""
    local = t.abs().max().reshape(1) if t.numel() else t.new_zeros(1)
    return comm.max(local, "max_abs") if comm is not None and comm.distributed else local


def out_of_reach(trace: list[float], target: float, iters_left: int, window: int = STALL_ITERS) -> bool:
    """Whether an ascent whose objective after each iteration is ``trace`` will not reach ``target`` within
    ``iters_left`` more iterations, judged by its pace: even at the better of its last two windows' gains
    (``window`` iterations each), kept for every iteration left, the target lies more than
    :data:`GIVE_UP_MARGIN` times that far. Never before two windows.

    The pace is extrapolated linearly, not as a slowing (geometric) tail: a trial that starts fast and then
    creeps steadily (the usual L-BFGS run from a moved start on an LM design) would be judged lost by a
    geometric tail while it still reaches its target (seen on SmolLM2, a move that gained 4.6e-4 per token).
    """
    if len(trace) <= 2 * window or trace[-1] >= target:
        return False
    g1 = trace[-1 - window] - trace[-1 - 2 * window]
    g2 = trace[-1] - trace[-1 - window]
    reach = max(g1, g2, 0.0) * iters_left / window
    return target - trace[-1] > GIVE_UP_MARGIN * reach


def _direction(g: Tensor, memory: list[tuple[Tensor, Tensor, float]], scale) -> Tensor:
    """``-H g`` by the L-BFGS two-loop recursion with initial inverse Hessian ``c * H0`` (``H0``: ``diag(scale)``
    for a tensor ``scale``, else the callable ``scale(v) = H0 v``)."""
    H0 = scale if callable(scale) else (lambda v: scale * v)
    q = g.clone()
    alphas = []
    for s, y, rho in reversed(memory):
        a = rho * float(s @ q)
        q -= a * y
        alphas.append(a)
    c = 1.0
    if memory:
        s, y, _ = memory[-1]
        c = float(s @ y) / float(y @ H0(y))
    r = c * H0(q)
    for (s, y, rho), a in zip(memory, reversed(alphas)):
        r += (a - rho * float(y @ r)) * s
    return -r


def _block_precond(X, lg: Tensor, u: Tensor, ridge: float, whitening: Whitening, dtype, chunk_size, comm):
    """``v -> H0 v`` with ``H0`` the inverse of the complete-data information per token: block ``k`` of the atoms
    ``(alpha_k C_k + ridge I)^{-1}`` (``C_k`` the covariance of ``X`` under component ``k``'s law), ``1 / alpha_k``
    for the weights' logits."""
    alpha = torch.softmax(u, 0).clamp_min(MIN_SCALE_WEIGHT)
    chol = curvature.factor_blocks(curvature.covariances(X, lg, whitening, dtype, chunk_size, comm), alpha, ridge)
    K, L = chol.shape[:2]

    def apply(v: Tensor) -> Tensor:
        vb = torch.cholesky_solve(v[: K * L].view(K, L, 1), chol).flatten()
        return torch.cat([vb, v[K * L :] / alpha])

    return apply


def _line_search(phi: Callable[[float], _Point], f0: float, slope0: float, t: float, max_trials: int = 30):
    """A step satisfying the strong Wolfe conditions (bracketing by doubling, then zooming with a safeguarded
    secant on the slope; Nocedal & Wright, Alg. 3.5-3.6). Returns ``(t, point)``; when the trials run out,
    the best step seen that satisfies sufficient decrease; ``None`` when there is none."""

    def decreases(tt: float, pt: _Point) -> bool:
        return math.isfinite(pt.f) and pt.f <= f0 + C1 * tt * slope0

    lo, f_lo, d_lo = 0.0, f0, slope0
    hi, d_hi = math.inf, math.nan
    best = None
    for _ in range(max_trials):
        pt = phi(t)
        if not decreases(t, pt) or pt.f >= f_lo:
            hi, d_hi = t, pt.slope
        else:
            best = (t, pt)
            if abs(pt.slope) <= -C2 * slope0:
                return best
            if math.isfinite(hi) and pt.slope * (hi - lo) >= 0 or not math.isfinite(hi) and pt.slope >= 0:
                hi, d_hi = lo, d_lo
            lo, f_lo, d_lo = t, pt.f, pt.slope
        if not math.isfinite(hi):
            t = 2.0 * t
            continue
        a, b = min(lo, hi), max(lo, hi)
        if b - a <= 1e-14 * max(1.0, b):
            break
        t = lo - d_lo * (hi - lo) / (d_hi - d_lo) if math.isfinite(d_hi) and d_hi != d_lo else 0.5 * (lo + hi)
        t = min(max(t, a + 0.1 * (b - a)), b - 0.1 * (b - a))
    return best


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
    history_size: int = 20,
    refresh: int = 50,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    on_iteration: Callable[[int, float], None] | None = None,
    comm=None,
    n_tokens: float | None = None,
    precondition: bool = True,
    precondition_every: int = 50,
    target: float | None = None,
) -> PolishResult:
    """L-BFGS (strong Wolfe line search on kept logits) on ``F / N`` from ``beta (K, L)``, ``log_alpha (K,)``.

    Stops after ``max_iter`` iterations or when the last :data:`STALL_ITERS` iterations gained less than
    ``tol`` per token each on average. Monotone: every accepted step raises the objective
    evaluated on the kept logits; a refresh may move it by their rounding (below 1e-12 per token in
    float64). ``dtype``: the dtype of the passes (default ``X``'s for float32/float64, else float32).
    ``on_iteration(n_iter, objective, loglik, beta, log_alpha)`` (per token; the current parameters) after
    each iteration. ``precondition``: the complete-data preconditioner above, rebuilt every
    ``precondition_every`` iterations (0: never). With a ``comm`` over several ranks,
    ``X`` and ``counts`` are this rank's rows and ``n_tokens`` the total over all ranks. ``target``: a per-token
    objective the caller needs reached (a trial move must beat the current fit); the run gives up (``gave_up``)
    once its pace says it will not get there (:func:`out_of_reach`).
    """
    dev = X.device
    dtype = _param_dtype(X, dtype)
    K = beta.shape[0]
    if precondition:
        Wh = torch.eye(beta.shape[1], dtype=torch.float64, device=dev)
        gamma = beta.to(device=dev, dtype=torch.float64).clone()
    else:
        Wh = whitening.W.to(dev)
        gamma = beta.to(device=dev, dtype=torch.float64) @ whitening.W_inv.to(dev).T  # (K, r)
    u = log_alpha.to(device=dev, dtype=torch.float64).clamp_min(-50.0)
    N = counts.total if n_tokens is None else n_tokens
    obj = _Marginal(X, counts, lam, bias, chunk_size, comm, N, dtype, Wh)
    r = gamma.shape[1]

    def unpack(theta: Tensor) -> tuple[Tensor, Tensor]:
        return theta[: K * r].view(K, r) @ Wh.T, theta[K * r :]

    theta = torch.cat([gamma.flatten(), u])
    b, u = unpack(theta)
    lg = obj.logits(b)
    point = obj.at(lg, b, u)
    g = obj.gradient(point, b, u)
    trace = [-point.f]
    memory: list[tuple[Tensor, Tensor, float]] = []
    n_iter, converged, since_refresh, gave_up = 0, False, 0, False
    H0 = _block_precond(X, lg, u, lam / N, whitening, dtype, chunk_size, comm) if precondition else None
    while n_iter < max_iter:
        if not precondition:  # per-component scaling by the current weights
            alpha = torch.softmax(u, 0).clamp_min(MIN_SCALE_WEIGHT)
            H0 = torch.cat([(1.0 / alpha).repeat_interleave(r), 1.0 / alpha])
        elif precondition_every and n_iter and n_iter % precondition_every == 0:
            H0 = _block_precond(X, lg, u, lam / N, whitening, dtype, chunk_size, comm)
        d = _direction(g, memory, H0)
        if float(g @ d) >= 0:  # not a descent direction: restart from the scaled gradient
            memory.clear()
            d = _direction(g, memory, H0)
        D, du = unpack(d)
        XD = obj.along(D)

        def phi(t: float, lg=lg, b=b, u=u, D=D, du=du, XD=XD) -> _Point:
            return obj.at(lg + t * XD, b + t * D, u + t * du, XD, D, du)

        slope0 = float(g @ d)
        # without curvature pairs the step's scale is unknown: start the search at a unit change of the logits
        # (the largest change over the whole vocabulary: every rank must start the same search)
        t0 = 1.0 if memory else min(1.0, 1.0 / max(float(_max_abs(XD, comm)), 1e-12))
        found = _line_search(phi, point.f, slope0, t0)
        n_iter += 1
        if found is None:
            if memory:
                memory.clear()
                continue
            converged = True  # no step along the scaled gradient raises the objective: optimal to rounding
            break
        t, new = found
        theta_new = theta + t * d
        b_new, u_new = unpack(theta_new)
        lg = lg + t * XD
        since_refresh += 1
        if since_refresh >= refresh:
            lg, since_refresh = obj.logits(b_new), 0
            new = obj.at(lg, b_new, u_new)
        g_new = obj.gradient(new, b_new, u_new)
        s_vec, y_vec = theta_new - theta, g_new - g
        sy = float(s_vec @ y_vec)
        if sy > 1e-12 * float(s_vec @ s_vec) ** 0.5 * float(y_vec @ y_vec) ** 0.5:
            memory.append((s_vec, y_vec, 1.0 / sy))
            if len(memory) > history_size:
                memory.pop(0)
        theta, b, u, g, point = theta_new, b_new, u_new, g_new, new
        trace.append(-point.f)
        if on_iteration is not None:
            on_iteration(n_iter, -point.f, point.loglik / N, b, torch.log_softmax(u, 0))
        if len(trace) > STALL_ITERS and trace[-1] - trace[-1 - STALL_ITERS] < STALL_ITERS * tol:
            converged = True
            break
        if target is not None and out_of_reach(trace, target, max_iter - n_iter):
            gave_up = True
            break
    if since_refresh:
        lg = obj.logits(b)
        point = obj.at(lg, b, u)
    return PolishResult(
        beta=b,
        log_alpha=torch.log_softmax(u, 0),
        objective=-point.f,
        loglik=point.loglik / N,
        trace=trace,
        n_evals=obj.n_evals,
        n_iter=n_iter,
        n_passes=obj.n_passes,
        converged=converged,
        gave_up=gave_up,
    )
