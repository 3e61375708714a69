"""The M-step for the atoms: a ridge-penalised weighted softmax regression (MATH.md §3).

For each component ``k``, with ``W_k = sum_j n_j gamma_jk`` and ``S1_k = sum_j n_j gamma_jk x_j``
(so ``mu_k = S1_k / W_k``), maximise the concave objective

    f_k(beta) = S1_k . beta - W_k A(beta) - (lam / 2) ||beta||^2
              = W_k [mu_k . beta - A(beta)] - (lam / 2) ||beta||^2

    gradient  g = S1_k - W_k m(beta) - lam beta
    Hessian   H = -W_k C(beta) - lam I

by Newton steps with a backtracking (Armijo) line search, all components at once: one pass
over ``X`` per trial point. Each accepted step raises ``f_k``, so EM never decreases the
penalised log-likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .kernels import SoftmaxMoments, softmax_moments

#: Armijo constant of the sufficient-increase test.
ARMIJO = 1e-4
#: Halvings of the step before a component keeps its current atom for this M-step.
MAX_BACKTRACKS = 30


def m_objective(beta: Tensor, A: Tensor, W: Tensor, S1: Tensor, lam: float) -> Tensor:
    """``f_k(beta_k)`` for every component: ``(K,)`` float64."""
    b = beta.to(torch.float64)
    return (S1.to(torch.float64) * b).sum(1) - W * A - 0.5 * lam * (b * b).sum(1)


def m_gradient(beta: Tensor, m: Tensor, W: Tensor, S1: Tensor, lam: float) -> Tensor:
    """``g_k = S1_k - W_k m(beta_k) - lam beta_k``: ``(K, L)``."""
    return S1 - W.to(beta.dtype)[:, None] * m - lam * beta


def m_hessian(C: Tensor, W: Tensor, lam: float) -> Tensor:
    """``H_k = -W_k C(beta_k) - lam I``: ``(K, L, L)``."""
    eye = torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    return -W.to(C.dtype)[:, None, None] * C - lam * eye


def _newton_direction(g: Tensor, H: Tensor) -> Tensor:
    """Solve ``(-H) d = g`` per component; a singular ``-H`` (lam = 0) gets a small jitter."""
    P = -H
    scale = torch.diagonal(P, dim1=1, dim2=2).abs().amax(dim=1).clamp_min(torch.finfo(P.dtype).tiny)
    jitter = torch.zeros_like(scale)
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(P + jitter[:, None, None] * eye)
        if not bool((info > 0).any()):
            return torch.cholesky_solve(g[:, :, None], chol)[:, :, 0]
        bad = info > 0
        jitter = torch.where(bad, torch.where(jitter > 0, jitter * 100, scale * 1e-10), jitter)
    # Give up on curvature: a gradient step, scaled, still ascends.
    return g / scale[:, None]


@dataclass
class MStepInfo:
    """What one M-step did: per-component accepted step sizes and passes over ``X``."""

    step_sizes: list[float] = field(default_factory=list)
    newton_steps: int = 0
    passes: int = 0


def newton_m_step(
    X: Tensor,
    beta: Tensor,
    W: Tensor,
    S1: Tensor,
    lam: float,
    moments: SoftmaxMoments,
    bias: Tensor | None = None,
    max_steps: int = 1,
    tol: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, SoftmaxMoments, MStepInfo]:
    """Up to ``max_steps`` damped Newton steps on every ``f_k`` from ``beta (K, L)``.

    Args:
        moments: ``A``, ``m`` and ``C`` at ``beta`` (``order=2``), e.g. from the last M-step.
        tol: stop a component once the predicted increase ``g . d / 2`` is below ``tol``
            (in the units of ``f``; the fitter passes ``tol_per_token × N``).

    Returns:
        The new atoms, their moments (``order=2``, ready for the next E- and M-step) and an
        :class:`MStepInfo`. Components whose objective cannot be raised keep their atom.
    """
    info = MStepInfo()
    beta = beta.clone()
    K = beta.shape[0]
    for _ in range(max_steps):
        f0 = m_objective(beta, moments.A, W, S1, lam)
        g = m_gradient(beta, moments.m, W, S1, lam)
        d = _newton_direction(g, m_hessian(moments.C, W, lam))
        slope = (g.to(torch.float64) * d.to(torch.float64)).sum(1)  # g . d > 0 for an ascent direction
        active = (slope > 2 * tol) & (slope > 0) & torch.isfinite(slope)
        if not bool(active.any()):
            break
        info.newton_steps += 1
        t = torch.ones(K, dtype=torch.float64, device=beta.device)
        todo = active.clone()
        for _ in range(MAX_BACKTRACKS + 1):
            trial = beta[todo] + t[todo].to(beta.dtype)[:, None] * d[todo]
            mom = softmax_moments(X, trial, bias, order=2, chunk_size=chunk_size)
            info.passes += 1
            f_t = m_objective(trial, mom.A, W[todo], S1[todo], lam)
            ok = f_t >= f0[todo] + ARMIJO * t[todo] * slope[todo]
            if bool(ok.any()):
                idx = torch.nonzero(todo).flatten()[ok]
                sel = torch.zeros(K, dtype=torch.bool, device=beta.device)
                sel[idx] = True
                beta[sel] = trial[ok]
                moments = moments.update(sel, mom.select(ok))
                todo[idx] = False
            if not bool(todo.any()):
                break
            t = torch.where(todo, t * 0.5, t)
        t = torch.where(todo, torch.zeros_like(t), t)  # never accepted: atom kept
        info.step_sizes = [float(v) if bool(a) else 0.0 for v, a in zip(t, active)]
    return beta, moments, info
