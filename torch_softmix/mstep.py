"""The M-step for the atoms: a ridge-penalised weighted softmax regression (docs/MATH.md §3).

For each component ``k``, with ``W_k = sum_j n_j gamma_jk`` and ``S1_k = sum_j n_j gamma_jk x_j``
(so ``mu_k = S1_k / W_k``), maximise the concave objective

    f_k(beta) = S1_k . beta - W_k A(beta) - (lam / 2) ||beta||^2
              = W_k [mu_k . beta - A(beta)] - (lam / 2) ||beta||^2

    gradient  g = S1_k - W_k m(beta) - lam beta
    Hessian   H = -W_k C(beta) - lam I

by damped Newton steps, all components at once. The Newton direction solves ``-H d = g`` exactly
(``"newton"``: ``K`` Hessians of size ``L x L``, ``O(p L^2 K)``) or by preconditioned conjugate
gradients on Hessian-vector products (``"newton-cg"``: two passes over ``X`` per iteration, no
``L x L`` matrix). The line search works on cached logits: with ``XD = X d^T`` computed once,

    A(beta + t d) - A(beta) = log sum_j s_j exp(t x_j . d)

costs ``O(p K)`` per trial and is accurate to rounding *relative to the change*, so the Armijo test
resolves tiny gains even when ``X`` is float32. Each accepted step raises ``f_k``; EM never
decreases the penalised log-likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import curvature, kernels
from .curvature import BlockPreconditioner, cholesky_with_jitter, exact
from .objective import atom_gradient

#: Armijo constant of the sufficient-increase test.
ARMIJO = 1e-4
#: Halvings of the step before a component keeps its current atom for this M-step.
MAX_BACKTRACKS = 40
M_STEPS = ("newton", "newton-cg", "auto")
#: ``m_step="auto"`` uses full Newton up to this hidden size, Newton-CG above it (where the blocks of
#: :mod:`torch_softmix.curvature` make 3 CG steps enough, Newton's ``K`` Hessians cost more from ``L`` ~ 40 on).
AUTO_NEWTON_MAX_L = 32


def m_objective(beta: Tensor, A: Tensor, W: Tensor, S1: Tensor, lam: float) -> Tensor:
    """``f_k(beta_k)`` for every component: ``(K,)`` float64 (the M-step's surrogate, one per component)."""
    b = beta.to(torch.float64)
    return (S1.to(torch.float64) * b).sum(1) - W * A - 0.5 * lam * (b * b).sum(1)


#: ``g_k = S1_k - W_k m(beta_k) - lam beta_k`` (:func:`torch_softmix.objective.atom_gradient`).
m_gradient = atom_gradient


def m_hessian(C: Tensor, W: Tensor, lam: float) -> Tensor:
    """``H_k = -W_k C(beta_k) - lam I``: ``(K, L, L)`` float64."""
    C = C.to(torch.float64)
    eye = torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    return -W[:, None, None] * C - lam * eye


@dataclass
class AtomState:
    """Atoms with their full logits cached: ``beta (K, L)``, ``logits (p, K)``, ``A (K,)``, all float64.

    ``logits = X beta^T + b`` (computed in the compute dtype, kept in float64) and
    ``A = logsumexp_j logits``. The fit updates the three together, so they stay consistent. ``precond``:
    the block preconditioner of the Newton-CG M-step (:mod:`torch_softmix.curvature`), built at earlier atoms.
    """

    beta: Tensor
    logits: Tensor
    A: Tensor
    precond: BlockPreconditioner | None = None  # the M-step's CG preconditioner, carried between M-steps

    @classmethod
    def from_beta(
        cls, X: Tensor, beta: Tensor, bias: Tensor | None, dtype: torch.dtype, chunk_size: int | None = None, comm=None
    ) -> AtomState:
        """The state at ``beta``: one pass over ``X`` (this rank's rows with a ``comm``; ``A`` over all ranks)."""
        beta = beta.to(device=X.device, dtype=dtype).to(torch.float64)  # representable in the compute dtype
        lg = kernels.logits(X, beta, bias, dtype=dtype, chunk_size=chunk_size)
        return cls(beta, lg, kernels.log_normalizer_from_logits(lg, comm))

    def moved_to(
        self, X: Tensor, beta: Tensor, dtype: torch.dtype, chunk_size: int | None = None, comm=None
    ) -> AtomState:
        """The state at ``beta (K, L)``, its logits updated from these by ``X (beta - self.beta)^T``.

        One pass over ``X``, like :meth:`from_beta`, but the new logits carry the same rounding history as
        the old ones, so objectives of the two states compare exactly (SQUAREM's acceptance test).
        """
        beta = beta.to(device=X.device, dtype=dtype).to(torch.float64)
        step = (beta - self.beta).to(dtype)
        lg = self.logits + kernels.project(X, step, chunk_size=chunk_size).to(torch.float64)
        return AtomState(beta, lg, kernels.log_normalizer_from_logits(lg, comm), self.precond)


def newton_direction(g: Tensor, H: Tensor) -> Tensor:
    """Solve ``(-H) d = g`` per component (float64); a singular ``-H`` (lam = 0) gets a small jitter, an unusable
    one a scaled gradient step (:func:`~torch_softmix.curvature.cholesky_with_jitter`)."""
    chol = cholesky_with_jitter(-H)
    return torch.cholesky_solve(g[:, :, None], chol)[:, :, 0]


def diagonal_solver(X: Tensor, s: Tensor, m: Tensor, W: Tensor, lam: float, chunk_size: int | None = None, comm=None):
    """``V (K, L) -> V / diag(W_k C_k + lam I)`` row by row (float64): the diagonal of each component's Newton
    matrix at the laws ``s (p, K)`` with means ``m (K, L)`` (one pass over ``X``)."""
    C = kernels.covariance_diagonal(X, s, m.to(s.dtype), chunk_size, comm).to(torch.float64)
    inv = 1.0 / (W.to(torch.float64)[:, None] * C + lam).clamp_min(torch.finfo(torch.float64).tiny)
    return lambda V: inv * V.to(torch.float64)


def cg_direction(
    X: Tensor,
    s: Tensor,
    m: Tensor,
    W: Tensor,
    lam: float,
    g: Tensor,
    max_iter: int = 10,
    rtol: float = 1e-3,
    chunk_size: int | None = None,
    comm=None,
    precond: BlockPreconditioner | None = None,
) -> tuple[Tensor, int]:
    """Solve ``(W_k C_k + lam I) d_k = g_k`` for all ``k`` by preconditioned conjugate gradients.

    ``s (p, K)`` and ``m (K, L)`` are the component laws and means at the current atoms. The
    preconditioner is ``precond`` (the blocks ``W_k C_k + lam I`` at earlier atoms) when given, else the
    diagonal (one more pass). Each CG iteration is one :func:`~torch_softmix.kernels.covariance_matvec`
    (two products over ``X``). Returns the direction ``(K, L)`` float64 and the number of CG iterations run.
    """
    dt = s.dtype
    Wd = W.to(torch.float64)
    m_dt = m.to(dt)
    solve = precond.solve if precond is not None else diagonal_solver(X, s, m_dt, Wd, lam, chunk_size, comm)

    def apply(V: Tensor) -> Tensor:
        CV = kernels.covariance_matvec(X, s, m_dt, V.to(dt), chunk_size, comm).to(torch.float64)
        return Wd[:, None] * CV + lam * V

    x = torch.zeros_like(g)
    r = g.clone()
    z = solve(r)
    if max_iter == 0:  # the preconditioned gradient itself (with the blocks: Newton's step for stale curvature)
        return z, 0
    pdir = z.clone()
    rz = (r * z).sum(1)
    target = rtol * g.norm(dim=1)
    active = g.norm(dim=1) > 0
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        Ap = apply(pdir)
        pAp = (pdir * Ap).sum(1)
        ok = active & (pAp > 0)
        a = torch.where(ok, rz / torch.where(ok, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
        x += a[:, None] * pdir
        r -= a[:, None] * Ap
        active = ok & (r.norm(dim=1) > target)
        if not bool(active.any()):
            break
        z = solve(r)
        rz_new = (r * z).sum(1)
        pdir = z + torch.where(active, rz_new / rz.clamp_min(torch.finfo(torch.float64).tiny), 0.0)[:, None] * pdir
        rz = rz_new
    return x, n_iter


@dataclass
class MStepInfo:
    """What one M-step did: accepted step sizes per component, Newton steps, CG iterations, passes over ``X``."""

    step_sizes: list[float] = field(default_factory=list)
    newton_steps: int = 0
    cg_iters: int = 0
    passes: int = 0


def _direction(X, s, m, g, W, lam, method, cg_max_iter, cg_rtol, chunk_size, info: MStepInfo, comm, precond) -> Tensor:
    """The Newton direction ``(W C + lam I)^{-1} g`` per component, exactly or by CG; counts its passes."""
    if method == "newton":
        C = kernels.covariance(X, s, m, chunk_size, comm)
        info.passes += 1
        return newton_direction(g, m_hessian(C, W, lam))
    d, n_cg = cg_direction(X, s, m, W, lam, g, cg_max_iter, cg_rtol, chunk_size, comm, precond)
    info.cg_iters += n_cg
    info.passes += (0 if precond is not None else 1) + 2 * n_cg
    return d


def armijo_steps(
    log_s: Tensor,
    XD: Tensor,
    slope: Tensor,
    active: Tensor,
    S1d: Tensor,
    bd: Tensor,
    dd: Tensor,
    W: Tensor,
    lam: float,
    comm=None,
) -> tuple[Tensor, Tensor]:
    """Backtracking on the cached logits: the step size ``t (K,)`` (0 where none passes) and ``A(beta + t d) - A(beta)``.

    ``log_s (p, K)`` are the current log-laws, ``XD = X d^T``; the gain of ``f_k`` at ``t`` is
    ``t S1.d - W [A(beta + t d) - A(beta)] - lam (t beta.d + t^2 |d|^2 / 2)``, the change of ``A`` being
    ``logsumexp_j (log s_j + t x_j.d)``: ``O(pK)`` per trial, exact relative to the change.
    """
    K = slope.shape[0]
    t = torch.ones(K, dtype=torch.float64, device=slope.device)
    todo = active.clone()
    accepted = torch.zeros(K, dtype=torch.bool, device=slope.device)
    dA = torch.zeros(K, dtype=torch.float64, device=slope.device)
    dA_t = torch.zeros(K, dtype=torch.float64, device=slope.device)
    for _ in range(MAX_BACKTRACKS + 1):
        # only the components still backtracking are evaluated (the same on every rank: todo is global)
        cols = torch.nonzero(todo).squeeze(1) if not bool(todo.all()) else None
        if cols is None:
            dA_t = kernels.log_normalizer_from_logits(log_s + t * XD, comm)
        else:
            dA_t[cols] = kernels.log_normalizer_from_logits(log_s[:, cols] + t[cols] * XD[:, cols], comm)
        gain = t * S1d - W * dA_t - lam * (t * bd + 0.5 * t * t * dd)
        ok = todo & (gain >= ARMIJO * t * slope)
        accepted |= ok
        dA = torch.where(ok, dA_t, dA)
        todo &= ~ok
        if not bool(todo.any()):
            break
        t = torch.where(todo, 0.5 * t, t)
    return torch.where(accepted, t, torch.zeros_like(t)), dA


def newton_m_step(
    X: Tensor,
    state: AtomState,
    W: Tensor,
    S1: Tensor,
    lam: float,
    *,
    dtype: torch.dtype,
    method: str = "newton",
    max_steps: int = 1,
    tol: float = 0.0,
    cg_max_iter: int = 10,
    cg_rtol: float = 1e-3,
    chunk_size: int | None = None,
    comm=None,
    precondition: bool = False,
    bias: Tensor | None = None,
    whitening=None,
    mean: Tensor | None = None,
) -> tuple[AtomState, MStepInfo]:
    """Up to ``max_steps`` damped Newton steps on every ``f_k``.

    Args:
        state: atoms and cached logits (:class:`AtomState`); a new state is returned.
        W: ``(K,)`` float64; S1: ``(K, L)``; lam: ridge (``>= 0``).
        dtype: dtype of the products over ``X``.
        method: ``"newton"`` or ``"newton-cg"`` (``"auto"`` is resolved by the caller).
        tol: skip a component once its predicted gain ``g . d / 2`` is below ``tol`` (units of ``f``).
        comm: a :class:`~torch_softmix.dist.Comm` when ``X`` and the cached logits are this rank's rows; every
            sum over the vocabulary is then all-reduced (sizes ``K x L`` or ``K``, never ``p``).
        precondition: Newton-CG with the block preconditioner
            (:class:`~torch_softmix.curvature.BlockPreconditioner`, carried in the returned state and rebuilt
            when stale; the caller decides, :func:`~torch_softmix.curvature.usable`); ``bias`` and ``whitening``
            (the design's) build it (without ``whitening`` by the exact ``p L^2 K`` pass).
        mean: the softmax means ``(K, L)`` at ``state``'s atoms (all ranks summed) when the E-step formed them
            (:func:`~torch_softmix.kernels.e_step_with_mean`): the first step then needs no pass for them.

    Components whose objective cannot be raised keep their atom (step size 0).
    """
    info = MStepInfo()
    W, S1 = W.to(torch.float64), S1.to(torch.float64)
    beta, lg, A = state.beta, state.logits, state.A
    blocks = precondition and method == "newton-cg"
    precond = state.precond if blocks else None
    for _ in range(max_steps):
        if blocks and (precond is None or precond.stale or precond.beta.shape != beta.shape):
            precond = BlockPreconditioner.build(X, beta, W, lam, bias, whitening, dtype, chunk_size, comm)
            info.passes += 3 if exact(whitening) else 1
        s = kernels.probs_from_logits(lg, A, dtype)
        if mean is not None and info.newton_steps == 0:  # at the atoms the E-step saw
            m = mean.to(dtype)
        else:
            m = kernels.allsum(kernels.weighted_sum(X, s, chunk_size=chunk_size), comm, "softmax_mean")
            info.passes += 1
        g = m_gradient(beta, m, W, S1, lam)
        n_cg = cg_max_iter if precond is None else min(cg_max_iter, curvature.BLOCK_CG_ITER)
        d = _direction(X, s, m, g, W, lam, method, n_cg, cg_rtol, chunk_size, info, comm, precond)
        if precond is not None:
            precond = precond.aged()
        d = d.to(dtype).to(torch.float64)  # the step the products see, exactly
        slope = (g * d).sum(1)  # > 0 for an ascent direction
        active = (slope > 2 * tol) & (slope > 0) & torch.isfinite(slope)
        if not bool(active.any()):
            break
        info.newton_steps += 1
        XD = kernels.project(X, d.to(dtype), chunk_size=chunk_size).to(torch.float64)  # (p, K)
        info.passes += 1
        dots = ((S1 * d).sum(1), (beta * d).sum(1), (d * d).sum(1))
        t, dA = armijo_steps(lg - A, XD, slope, active, *dots, W, lam, comm)
        beta = beta + t[:, None] * d
        lg = lg + t * XD
        A = A + dA
        info.step_sizes = t.tolist()
    return AtomState(beta, lg, A, precond), info
