"""The EM engine: a frozen problem, a state, the E- and M-steps, SQUAREM, and one run loop (docs/MATH.md §3).

    problem = FitProblem(design, counts, dtype=..., ridge=..., m_step="newton-cg")
    point = problem.evaluate(problem.state(alpha, beta))     # E-step at a start
    result = run(problem, point, max_iter=300, accelerate="squarem", callback=...)

Nothing here keeps hidden state: a :class:`FitProblem` holds everything that does not change during
a fit (design, counts, dtype, chunking, ridge, M-step settings), a :class:`State` the parameters with
their cached logits, a :class:`Point` a state with its E-step. :func:`run` is the only loop; history,
progress bars and checkpoints hang off its ``callback``. :class:`~torch_softmix.em.EMFitter` builds
the problem, the starts and the callbacks around it.

The objective ``F / N`` (:func:`~torch_softmix.objective.per_token_objective`) never decreases along a
run: each M-step raises the surrogate (damped Newton with an Armijo test), and SQUAREM keeps an
extrapolation only when it is at least as good as the plain EM iterate. Cached logits are updated by
steps and so drift by rounding from ``X beta^T``; every run ends by recomputing them from the atoms
(:meth:`FitProblem.refresh`), so the reported log-likelihood is that of the returned atoms exactly.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from . import curvature, kernels
from .data import TokenCounts
from .design import Design
from .mstep import AtomState, newton_m_step
from .objective import per_token_objective

ACCELERATIONS = (None, "squarem")
#: Extrapolation lengths tried by SQUAREM before it settles for the plain EM iterate.
SQUAREM_BACKTRACKS = 8
#: Weight logits are clamped here when flattened (a collapsed component has ``log alpha = -inf``).
LOG_ALPHA_FLOOR = -50.0


@dataclass
class State:
    """Parameters of one EM run: ``log_alpha (K,)`` float64 and the atoms with their cached logits."""

    log_alpha: Tensor
    atoms: AtomState

    @property
    def beta(self) -> Tensor:
        return self.atoms.beta


@dataclass
class Point:
    """A state with its E-step: statistics, per-token log-likelihood and per-token objective."""

    state: State
    stats: kernels.EStepStats
    loglik: float
    objective: float


@dataclass(frozen=True)
class FitProblem:
    """Everything fixed during a fit.

    ``m_step`` is ``"newton"`` or ``"newton-cg"`` (already resolved from ``"auto"``); ``tol`` is the
    per-token gain below which a run stops (and, scaled, the M-step's own stopping rule).
    """

    design: Design
    counts: TokenCounts
    dtype: torch.dtype
    ridge: float = 1e-6
    m_step: str = "newton-cg"
    m_step_iter: int = 1
    cg_max_iter: int = 10
    cg_rtol: float = 1e-3
    tol: float = 1e-9
    n_total: float | None = None  # N over the whole vocabulary when ``counts`` are one rank's share

    @property
    def X(self) -> Tensor:
        return self.design.X

    @property
    def bias(self) -> Tensor | None:
        return self.design.bias

    @property
    def chunk_size(self) -> int | None:
        return self.design.chunk_size

    @property
    def comm(self):
        """The design's :class:`~torch_softmix.dist.Comm` (one rank: no communication)."""
        return self.design.comm

    @property
    def n_tokens(self) -> float:
        return self.counts.total if self.n_total is None else self.n_total

    @property
    def lam(self) -> float:
        """The ridge in units of the total objective: ``ridge * N``."""
        return self.ridge * self.n_tokens

    @cached_property
    def fuse_mean(self) -> bool:
        """Whether the E-step also forms the M-step's softmax means, in one pass over all rows: where the
        counts' support covers enough of the vocabulary (:func:`~torch_softmix.kernels.fuse_pays`, over all ranks,
        so that every rank decides alike: one all-reduce of two numbers, the first time it is asked)."""
        sizes = torch.tensor([self.counts.support.numel(), self.X.shape[0]], dtype=torch.float64)
        sizes = kernels.allsum(sizes.to(self.design.device), self.comm, "support")
        return kernels.fuse_pays(float(sizes[0]), float(sizes[1]), self.X.shape[1])

    # ------------------------------------------------------------------ states
    def state(self, alpha: Tensor, beta: Tensor) -> State:
        """A fresh state at weights ``alpha (K,)`` (normalised) and atoms ``beta (K, L)``: one pass over ``X``."""
        alpha = alpha.to(device=self.design.device, dtype=torch.float64)
        atoms = AtomState.from_beta(self.X, beta, self.bias, self.dtype, self.chunk_size, self.comm)
        return State(torch.log(alpha / alpha.sum()), atoms)

    def refresh(self, state: State) -> State:
        """The parameters as a head of the compute dtype stores them (``log alpha`` rounded to it, renormalised
        in float64), with the logits recomputed from the atoms: no accumulated rounding is left."""
        log_alpha = state.log_alpha.to(self.dtype).to(torch.float64).log_softmax(0)
        atoms = AtomState.from_beta(self.X, state.beta, self.bias, self.dtype, self.chunk_size, self.comm)
        return State(log_alpha, atoms)

    def evaluate(self, state: State) -> Point:
        """The E-step at ``state``: statistics, per-token log-likelihood and objective."""
        stats = e_step(self, state)
        N = self.n_tokens
        return Point(state, stats, float(stats.loglik) / N, per_token_objective(stats.loglik, state.beta, self.lam, N))


# ---------------------------------------------------------------------- steps
def e_step(problem: FitProblem, state: State) -> kernels.EStepStats:
    """Sufficient statistics ``W (K,)``, ``S1 (K, L)`` and the log-likelihood, on the support of the counts, and
    (where :attr:`FitProblem.fuse_mean`) the softmax means the next M-step starts from, in the same pass.

    With rows shared among ranks, they are one all-reduce of ``1 + K + K L`` numbers (``+ K L`` with the means).
    """
    c, atoms = problem.counts, state.atoms
    if problem.fuse_mean:
        stats = kernels.e_step_with_mean(
            problem.X, atoms.logits, state.log_alpha, atoms.A, c.support, c.values, problem.dtype, problem.chunk_size
        )
    else:
        lg = atoms.logits.index_select(0, c.support)
        stats = kernels.e_step_from_logits(
            problem.X, lg, state.log_alpha, atoms.A, c.support, c.values, problem.dtype, problem.chunk_size
        )
    return kernels.reduce_stats(stats, problem.comm)


def m_step(problem: FitProblem, point: Point) -> tuple[State, dict]:
    """Weights ``alpha = W / N`` exactly; atoms by damped Newton steps on each component's surrogate."""
    stats = point.stats
    # the whitening (computed once, with collectives) is asked for only when the blocks are used
    blocks = problem.m_step == "newton-cg" and curvature.usable(problem.design, stats.W.shape[0])
    atoms, info = newton_m_step(
        problem.X,
        point.state.atoms,
        stats.W,
        stats.S1,
        problem.lam,
        dtype=problem.dtype,
        method=problem.m_step,
        max_steps=problem.m_step_iter,
        tol=0.01 * problem.tol * problem.n_tokens,
        cg_max_iter=problem.cg_max_iter,
        cg_rtol=problem.cg_rtol,
        chunk_size=problem.chunk_size,
        comm=problem.comm,
        precondition=blocks,
        bias=problem.bias,
        whitening=problem.design.whitening if blocks else None,
        mean=stats.mean,
    )
    log_alpha = torch.log(stats.W) - math.log(problem.n_tokens)
    return State(log_alpha, atoms), {"step_sizes": info.step_sizes, "passes": info.passes, "cg_iters": info.cg_iters}


def em_map(problem: FitProblem, point: Point) -> tuple[Point, dict]:
    """One EM iteration: the M-step from ``point``'s statistics, then the E-step at the new parameters."""
    state, info = m_step(problem, point)
    return problem.evaluate(state), info


def _flat(point: Point) -> Tensor:
    return torch.cat([point.state.beta.flatten(), point.state.log_alpha.clamp_min(LOG_ALPHA_FLOOR)])


def squarem(problem: FitProblem, p0: Point, p1: Point, p2: Point) -> tuple[Point, float]:
    """SQUAREM (Varadhan & Roland 2008, SqS3) from three EM iterates; never worse than ``p2``.

    ``theta' = theta0 - 2 a r + a^2 v`` with ``r = theta1 - theta0``, ``v = theta2 - 2 theta1 + theta0``
    and ``a = -|r| / |v|``, over the atoms and ``log alpha``. ``a`` is moved toward ``-1`` (which gives
    ``theta2``) until the objective at ``theta'`` is at least ``p2``'s; the trial's logits are updated
    from ``p2``'s so that the comparison carries no rounding difference. Returns the point and ``a``.
    """
    t0, t1, t2 = _flat(p0), _flat(p1), _flat(p2)
    r, v = t1 - t0, t2 - 2 * t1 + t0
    vv = float(v @ v)
    if vv <= 0 or not math.isfinite(vv):
        return p2, -1.0
    a = -math.sqrt(float(r @ r) / vv)
    K, L = p0.state.beta.shape
    for _ in range(SQUAREM_BACKTRACKS):
        if a >= -1.0:
            break
        theta = t0 - 2 * a * r + a * a * v
        if bool(torch.isfinite(theta).all()):
            beta = theta[: K * L].reshape(K, L)
            atoms = p2.state.atoms.moved_to(problem.X, beta, problem.dtype, problem.chunk_size, problem.comm)
            point = problem.evaluate(State(torch.log_softmax(theta[K * L :], 0), atoms))
            if point.objective >= p2.objective:
                return point, a
        a = 0.5 * (a - 1.0)
    return p2, -1.0


# ---------------------------------------------------------------------- the loop
@dataclass
class RunResult:
    """The end of a run: the final point (logits refreshed), the history, the iteration count and why it stopped.

    ``stop`` is ``"tol"`` (gain below ``tol``: converged), ``"max_iter"``, ``"slow"`` (EM's measured rate
    exceeded ``switch_rate``: the quasi-Newton phase takes over) or ``"decrease"`` (a step lost more than
    rounding; the previous iterate is kept and a warning was issued).
    """

    point: Point
    history: list[dict] = field(default_factory=list)
    n_iter: int = 0
    stop: str = "max_iter"

    @property
    def converged(self) -> bool:
        return self.stop == "tol"

    @property
    def state(self) -> State:
        return self.point.state


#: ``callback(point, history, n_iter)`` after every accepted iterate.
Callback = Callable[[Point, list, int], None]


def _step(problem: FitProblem, prev: Point, accelerate: str | None, room: int) -> tuple[Point, dict, int]:
    """One EM iteration, or two and an extrapolation with SQUAREM when ``room >= 2``: ``(point, info, maps)``."""
    if accelerate == "squarem" and room >= 2:
        p1, info = em_map(problem, prev)
        p2, _ = em_map(problem, p1)
        point, a = squarem(problem, prev, p1, p2)
        return point, {**info, "squarem_step": a}, 2
    point, info = em_map(problem, prev)
    return point, info, 1


def _slow(history: list[dict], switch_rate: float) -> bool:
    """Whether EM has settled into slow linear convergence: over each of its last two steps the gain shrank by
    a factor between ``switch_rate`` and 1 *per EM map* (a SQUAREM step spans two maps, so its gain ratio is
    taken to the power 1/2; a ratio above 1 is EM speeding up, not creeping).

    Measured on the history (which checkpoints keep), so a resumed run hands over where the
    uninterrupted one does."""
    if len(history) < 5:
        return False
    last = history[-4:]
    f = [h["objective"] for h in last]
    gains = [b - a for a, b in zip(f, f[1:])]
    maps = [max(1, b["iter"] - a["iter"]) for a, b in zip(last, last[1:])]
    return all(0 < g1 <= g0 and (g1 / g0) ** (1.0 / m) > switch_rate for g0, g1, m in zip(gains, gains[1:], maps[1:]))


def _is_rounding(problem: FitProblem, prev: Point, point: Point) -> bool:
    """Whether a loss is within rounding of the objective: each token's ``log pi = logit - A`` loses digits
    relative to the logits' size, so the scale is the larger of the objective and the log-normalisers; the
    logits carry the rounding of the compute dtype (float32 for float32 and half-precision designs), the
    likelihood that of float64 sums."""
    scale = max(1.0, abs(prev.objective), float(prev.state.atoms.A.abs().max()))
    eps = max(1e3 * torch.finfo(torch.float64).eps, torch.finfo(problem.dtype).eps)
    return prev.objective - point.objective <= eps * scale


def run(
    problem: FitProblem,
    start: Point,
    max_iter: int,
    *,
    accelerate: str | None = "squarem",
    history: list[dict] | None = None,
    n_done: int = 0,
    callback: Callback | None = None,
    switch_rate: float | None = None,
) -> RunResult:
    """EM from ``start`` until the per-token gain falls below ``problem.tol`` or ``max_iter`` EM iterations
    (M-steps, counted from the start of the whole fit: ``n_done`` are already done) have run.

    With ``switch_rate``, the run also stops (``"slow"``) once EM converges slowly: when over each of the last
    two steps the gain shrank by a factor between ``switch_rate`` and 1 per EM map (EM's linear rate, the
    fraction of missing information, measured); a quasi-Newton method is then the faster way on.

    ``history`` continues an earlier run's (a resumed or screened fit); one dict per accepted iterate
    with ``iter``, ``loglik``, ``objective``, ``time`` and what the M-step did.
    """
    point = start
    t0 = time.perf_counter() - (history[-1]["time"] if history else 0.0)
    if history is None:
        history = [{"iter": n_done, "loglik": point.loglik, "objective": point.objective, "time": 0.0}]
    n_iter, stop = n_done, "max_iter"
    while n_iter < max_iter:
        if switch_rate is not None and _slow(history, switch_rate):
            stop = "slow"
            break
        prev = point
        point, info, maps = _step(problem, prev, accelerate, max_iter - n_iter)
        n_iter += maps
        gain = point.objective - prev.objective
        entry = {"iter": n_iter, "loglik": point.loglik, "objective": point.objective, **info}
        history.append({**entry, "time": time.perf_counter() - t0})
        if gain < 0:  # EM cannot decrease F: rounding, or a bug if large. Keep the better iterate.
            history[-1]["decrease"] = -gain
            rounding = _is_rounding(problem, prev, point)
            if not rounding:
                warnings.warn(
                    f"EM objective decreased from {prev.objective:.12g} to {point.objective:.12g} per token at "
                    f"iteration {n_iter}; stopping at the previous iterate. Please report this with the data.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            point, stop = prev, ("tol" if rounding else "decrease")
            break
        if callback is not None:
            callback(point, history, n_iter)
        if gain < problem.tol:
            stop = "tol"
            break
    point = problem.evaluate(problem.refresh(point.state))
    history[-1].update(loglik=point.loglik, objective=point.objective)
    return RunResult(point, history, n_iter, stop)
