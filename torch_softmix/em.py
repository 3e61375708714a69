"""EMFitter: the estimator users call, scikit-learn style (docs/MATH.md §3–§4).

The fitter checks its parameters (declared once in ``_parameter_constraints``), builds a
:class:`~torch_softmix.engine.FitProblem`, resumes a checkpoint or makes its starts
(:mod:`torch_softmix.starts`), screens them with a few EM iterations each, continues the best with
:func:`~torch_softmix.engine.run`, optionally runs the L-BFGS phase (:mod:`torch_softmix.polish`),
and stores what it found in attributes with a trailing underscore. It keeps no state of its own
while a fit runs: everything the steps need travels in the problem and the run's arguments.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .checkpoint import Checkpointer, checkpoint_key, resume, start_digest
from .data import TokenCounts, as_counts
from .design import Design, as_design
from .engine import ACCELERATIONS, FitProblem, RunResult
from .head import SoftmaxMixtureHead, _param_dtype
from .mstep import AUTO_NEWTON_MAX_L, M_STEPS
from .objective import information_criteria
from .progress import Bars
from .search import FitEvent, Schedule, polish_phase, refine, resume_run, screen_and_continue
from .starts import MOM_METHODS, STARTS, Start, StartRequest, given_start, make_starts
from .validation import (
    Check,
    Int,
    OneOf,
    Real,
    check_compute_dtype,
    check_device,
    check_number,
    check_random_state,
    make_generator,
    validate_params,
)

#: A component whose weight falls below this has collapsed (reported in ``collapsed_`` and a warning).
COLLAPSE_WEIGHT = 1e-8


class ConvergenceWarning(UserWarning):
    """A fit ended on its iteration budget before its convergence test was met (as scikit-learn's)."""


def _check_init(name: str, value: Any) -> None:
    if isinstance(value, str):
        if value not in STARTS:
            raise ValueError(
                f"{name} must be one of {tuple(STARTS)}, a SoftmaxMixtureHead or a dict with 'alpha' and 'beta'; "
                f"got {value!r}"
            )
    elif not isinstance(value, (dict, SoftmaxMixtureHead)):
        raise TypeError(f"{name} must be a string, a SoftmaxMixtureHead or a dict, got {type(value).__name__}")


def _check_rate(name: str, value: Any) -> None:
    if value is not None:
        check_number(name, value, strict=True)
        if value >= 1:
            raise ValueError(f"{name} must be in (0, 1) (a ratio of successive EM gains) or None, got {value!r}")


class EMFitter:
    """Fit a :class:`SoftmaxMixtureHead` by EM from token ids or counts.

    Args:
        n_components: ``K >= 1``.
        init: where EM starts: a registered name (``"auto"`` (default: MoM and k-means starts, the best by
            screened objective), ``"mom"``, ``"subspace"``, ``"kmeans"``, ``"random"``; see
            :mod:`torch_softmix.starts`), or a :class:`SoftmaxMixtureHead` or a dict with
            ``"alpha" (K,)`` and ``"beta" (K, L)`` (a warm start; an oracle start when given the truth).
        n_init: number of starts; the one with the best objective is kept.
        init_max_iter: with several starts, each runs this many EM iterations (screening) and only the
            best continues; ``None`` runs every start to convergence. With more than four starts the screening
            is successive halving: every start runs two EM iterations and the four best run the rest.
        mom_method: ``"tensor"`` (third moment, Jennrich) or ``"univariate"`` (Hermite moments along directions).
        max_iter: EM iterations of the final run, *after* screening (the kept start's screening iterations
            come on top; ``n_iter_`` counts both).
        tol: a run stops when the per-token objective rises by less than ``tol`` in an iteration.
        ridge: per-token ridge; the penalty is ``(ridge N / 2) sum_k |beta_k|^2``. ``0`` allowed.
        m_step: ``"newton"`` (``K`` Hessians ``L x L``), ``"newton-cg"`` (Hessian-vector products) or
            ``"auto"`` (Newton for ``L <= 32``); the one used is ``m_step_``.
        m_step_iter: Newton steps per M-step (1 = generalised EM).
        cg_max_iter, cg_rtol: conjugate-gradient budget and relative residual for ``"newton-cg"`` (with the
            block preconditioner of :mod:`torch_softmix.curvature`, when it fits, at most 3 CG steps suffice).
        accelerate: ``"squarem"`` (default; an extrapolation every two EM iterations, kept only when not
            worse, so the fit stays monotone) or ``None``.
        polish_iter: after EM, up to this many L-BFGS iterations on the marginal likelihood
            (:func:`~torch_softmix.polish.polish`, two passes over ``X`` each); kept only if at least as good
            as EM. ``0``: none (EM alone, to convergence or ``max_iter``).
        switch_rate: EM hands over to the L-BFGS phase as soon as its measured rate (a step's gain over the
            previous step's, per EM map: a SQUAREM step counts two) exceeds this on two steps running: EM is
            fast while it makes big moves, L-BFGS where EM creeps (an EM map costs about three L-BFGS
            iterations' passes, so a rate of 0.3 per map is already slower than L-BFGS near an optimum).
            ``None``: EM runs to its own convergence first.
        n_moves: after the fit converges, rounds of split-and-merge moves (:mod:`torch_softmix.moves`): each
            round builds every move there is (at most 400 trials, the best-scored: all of them up to ``K = 8``),
            screens them by a few EM iterations, and continues the ``n_moves`` best screened by EM and L-BFGS,
            best first (a trial's L-BFGS run gives up once its pace says it will not beat the fit); the first
            that raises the objective is kept and the next round begins
            (:func:`~torch_softmix.search.refine`). ``0``: no moves. With the vocabulary shared among ranks,
            every rank takes the same moves (the same result as one process).
        n_transfers: after the moves, rounds of *transfers*: a group of one component's frequent tokens (a
            k-means half, or a token with its companions) handed to another component
            (:func:`~torch_softmix.moves.transfer_starts`); the ``n_transfers`` best-scored of each kind are
            screened like the moves, both finalists continued and the better kept if it gains (so the fit ends
            at least as high as without them).
            ``0`` (default): none; ``3`` is what the README's "Limitations" measured on SmolLM2 (what they buy
            there, and at what price). One process only: skipped (with a warning) when the vocabulary is
            shared among ranks.
        checkpoint: a file the run is saved to every ``checkpoint_every`` EM iterations (atomically). If it
            exists when ``fit`` starts, the fit resumes from it (after checking that design, bias, counts and
            settings agree) without recomputing the starts, and ends as an uninterrupted fit would
            (bit-exact on CPU). With several starts, it covers the run continued after screening.
        random_state: seed (int), ``torch.Generator``, or ``None`` (a fresh seed each fit; over several ranks,
            rank 0's, so that all ranks draw the same starts).
        device: where to compute (default: the embedding's). dtype: compute dtype (float32 for
            half-precision embeddings, else the embedding's). Likelihoods are always float64.
        progress: progress bars (tqdm) for screening, EM and the L-BFGS phase.
        chunk_size: rows of ``X`` per chunk (default automatic).

    Fitted attributes: ``head_``, ``converged_``, ``stop_reason_`` (``"tol"``, ``"max_iter"``, ``"decrease"``,
    ``"polish_tol"``, ``"polish_max_iter"``), ``n_iter_``, ``lower_bound_`` (per-token log-likelihood of
    ``head_``), ``lower_bounds_`` (per iteration), ``objective_``, ``history_``, ``collapsed_``, ``m_step_``,
    ``init_names_``, ``init_results_``, ``init_logliks_``, ``best_init_``, ``init_info_``, ``mom_``,
    ``polish_``, ``moves_``, ``n_tokens_``.
    """

    _parameter_constraints = {
        "n_components": Int(1),
        "init": Check(_check_init),
        "n_init": Int(1),
        "init_max_iter": Int(1, allow_none=True),
        "mom_method": OneOf(MOM_METHODS),
        "max_iter": Int(1),
        "tol": Real(),
        "ridge": Real(),
        "m_step": OneOf(M_STEPS),
        "m_step_iter": Int(1),
        "cg_max_iter": Int(1),
        "cg_rtol": Real(),
        "accelerate": OneOf(ACCELERATIONS),
        "polish_iter": Int(0),
        "switch_rate": Check(_check_rate),
        "n_moves": Int(0),
        "n_transfers": Int(0),
        "checkpoint_every": Int(1),
        "random_state": Check(check_random_state),
        "device": Check(check_device),
        "dtype": Check(check_compute_dtype),
        "chunk_size": Int(1, allow_none=True),
    }

    def __init__(
        self,
        n_components: int,
        init: str | SoftmaxMixtureHead | dict = "auto",
        n_init: int = 4,
        init_max_iter: int | None = 10,
        mom_method: str = "tensor",
        max_iter: int = 300,
        tol: float = 1e-9,
        ridge: float = 1e-6,
        m_step: str = "auto",
        m_step_iter: int = 1,
        cg_max_iter: int = 10,
        cg_rtol: float = 1e-3,
        accelerate: str | None = "squarem",
        polish_iter: int = 1000,
        switch_rate: float | None = 0.3,
        n_moves: int = 2,
        n_transfers: int = 0,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        random_state: int | torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        self.n_components, self.init, self.n_init, self.init_max_iter = n_components, init, n_init, init_max_iter
        self.mom_method, self.max_iter, self.tol, self.ridge = mom_method, max_iter, tol, ridge
        self.m_step, self.m_step_iter, self.cg_max_iter, self.cg_rtol = m_step, m_step_iter, cg_max_iter, cg_rtol
        self.accelerate, self.polish_iter, self.switch_rate = accelerate, polish_iter, switch_rate
        self.n_moves, self.n_transfers = n_moves, n_transfers
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.checkpoint_every, self.random_state = checkpoint_every, random_state
        self.device, self.dtype, self.progress, self.chunk_size = device, dtype, progress, chunk_size

    # ------------------------------------------------------------------ set-up
    def _validate(self) -> None:
        validate_params(self._parameter_constraints, self)
        if self.checkpoint is not None and self.n_init > 1 and self.init_max_iter is None:
            raise ValueError("checkpoint needs init_max_iter (screened starts) when n_init > 1")

    def _problem(self, embedding_or_head, bias, tokens, counts) -> tuple[FitProblem, TokenCounts]:
        """The problem of this fit (this rank's rows and counts) and the counts of the whole vocabulary."""
        if isinstance(embedding_or_head, SoftmaxMixtureHead):
            if bias is not None:
                raise ValueError("bias is taken from the head; do not pass bias= with a head")
            h = embedding_or_head
            design = Design(h.embedding, h.bias, chunk_size=self.chunk_size or h.chunk_size)
        else:
            design = as_design(embedding_or_head, bias, self.chunk_size)
        design = design.to(self.device)
        data = as_counts(tokens, counts, design.vocab_size).to(design.device)
        if data.n_distinct < self.n_components:
            raise ValueError(
                f"n_components={self.n_components} is larger than the {data.n_distinct} distinct tokens seen: the "
                "mixture is not identifiable; sample more tokens or lower n_components"
            )
        m_step = self.m_step
        if m_step == "auto":
            m_step = "newton" if design.hidden_size <= AUTO_NEWTON_MAX_L else "newton-cg"
        dtype = _param_dtype(design.X, self.dtype)
        local = data.rows(design.lo, design.hi) if design.comm.distributed else data  # this rank's share
        problem = FitProblem(
            design, local, dtype, self.ridge, m_step, self.m_step_iter, self.cg_max_iter, self.cg_rtol, self.tol,
            n_total=data.total,
        )  # fmt: skip
        return problem, data

    def _key(self, problem: FitProblem, data: TokenCounts) -> dict[str, str]:
        init = self.init
        if not isinstance(init, str):
            g = given_start(init, self.n_components, problem.design.hidden_size)
            init = f"given:{start_digest(g.alpha, g.beta)}"
        rs = self.random_state
        seed = rs.initial_seed() if isinstance(rs, torch.Generator) else rs
        settings = {"n_components": self.n_components, "init": init, "n_init": self.n_init, "random_state": seed}
        settings.update(init_max_iter=self.init_max_iter, mom_method=self.mom_method, accelerate=self.accelerate)
        return checkpoint_key(problem, settings, data)

    def _starts(self, problem: FitProblem, gen: torch.Generator) -> tuple[list[Start], dict]:
        if not isinstance(self.init, str):
            return [given_start(self.init, self.n_components, problem.design.hidden_size)], {}
        req = StartRequest(problem.design, problem.counts, self.n_components, self.n_init, gen, problem.dtype)
        req.ridge, req.mom_method = self.ridge, self.mom_method
        return make_starts(self.init, req)

    def _random_state(self, problem: FitProblem) -> int | torch.Generator | None:
        """``random_state``, with ``None`` resolved once for all ranks when the vocabulary is shared among them:
        every rank must draw the same starts and moves, so rank 0's fresh seed is broadcast."""
        if self.random_state is not None or not problem.comm.distributed:
            return self.random_state
        seed = torch.tensor([torch.Generator().seed() % 2**62], dtype=torch.int64, device=problem.design.device)
        return int(problem.comm.broadcast(seed, name="seed"))

    @staticmethod
    def _moves_generator(random_state: int | torch.Generator | None) -> torch.Generator:
        """The split moves' own random stream, derived from ``random_state`` (so a resumed fit draws the same)."""
        seed = random_state.initial_seed() if isinstance(random_state, torch.Generator) else random_state
        return make_generator(None if seed is None else int(seed) + 1)

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(
        self,
        embedding_or_head: Tensor | Design | SoftmaxMixtureHead,
        *,
        tokens: Tensor | Iterable[Tensor] | None = None,
        counts: Tensor | TokenCounts | None = None,
        bias: Tensor | None = None,
        callback: Callable[[FitEvent], None] | None = None,
    ) -> SoftmaxMixtureHead:
        """Fit the mixture to ``tokens`` (ids, any shape, or shards) or ``counts`` (``(p,)`` or :class:`TokenCounts`).

        ``embedding_or_head`` is the design ``X (p, L)``, a :class:`~torch_softmix.design.Design` (reuse it to
        keep its whitening across fits) or a head whose embedding and bias are used. ``callback(event)`` is
        called after every accepted EM iterate with a :class:`FitEvent`; an exception raised there stops the
        fit (a checkpoint written before it stays). Returns the fitted head (also ``self.head_``), sharing the
        embedding's storage.
        """
        self._validate()
        problem, data = self._problem(embedding_or_head, bias, tokens, counts)
        ckpt, saved = None, None
        if self.checkpoint is not None:
            key = self._key(problem, data)
            saved = resume(self.checkpoint, key, problem)  # before any start is computed
            ckpt = Checkpointer(self.checkpoint, key, self.checkpoint_every, comm=problem.comm)
        sched = Schedule(self.max_iter, self.init_max_iter, self.accelerate, self.polish_iter, self.switch_rate,
                         self.n_moves, self.n_transfers)
        random_state = self._random_state(problem)
        with Bars(self.progress and problem.comm.rank == 0, f"K={self.n_components}") as bars:
            if saved is not None:
                result, record = resume_run(problem, saved, sched, bars, ckpt, callback)
            else:
                starts, info = self._starts(problem, make_generator(random_state))
                result, record = screen_and_continue(problem, starts, info, sched, bars, ckpt, callback)
            polish_info, moves_info = None, None
            best = record["init_names"][record["best_init"]]
            if self.polish_iter > 0:
                result, polish_info = polish_phase(problem, result, sched, bars, callback, best)
            if self.n_transfers > 0 and problem.comm.distributed:  # one process only: see README "Limitations"
                warnings.warn("transfers are skipped when the vocabulary is shared among ranks (the split-and-merge "
                              "moves still run); pass n_transfers=0 to silence this", RuntimeWarning, stacklevel=3)
                sched = replace(sched, n_transfers=0)
            if sched.n_moves + sched.n_transfers > 0 and self.n_components > 1:
                gen = self._moves_generator(random_state)
                result, moves_info = refine(problem, result, sched, bars, callback, gen, best)
        return self._finish(problem, result, record, polish_info, moves_info)

    def _finish(self, problem: FitProblem, result: RunResult, record: dict, polish_info: dict | None,
                moves_info: dict | None = None):
        state = result.state
        head = SoftmaxMixtureHead(  # over the whole design, also when the fit shared its rows among ranks
            problem.design.full_X,
            self.n_components,
            problem.design.full_bias,
            dtype=problem.dtype,
            chunk_size=self.chunk_size,
            validate_args=False,
        )
        head.log_alpha.copy_(state.log_alpha)
        head.beta.copy_(state.beta)
        self.head_, self.n_tokens_, self.m_step_, self.polish_ = head, problem.n_tokens, problem.m_step, polish_info
        self.moves_ = moves_info
        self.stop_reason_ = result.stop
        self.converged_ = result.stop in ("tol", "polish_tol")
        self.n_iter_, self.history_ = int(result.n_iter), result.history
        self.lower_bound_, self.objective_ = float(result.point.loglik), float(result.point.objective)
        self.lower_bounds_ = [h["loglik"] for h in result.history]
        self.init_names_, self.init_results_ = record["init_names"] or ["resumed"], record["init_results"]
        self.init_logliks_, self.best_init_ = record["init_logliks"], record["best_init"]
        self.init_info_ = {k: v for k, v in record["init_info"].items() if k != "mom"}
        self.mom_ = record["init_info"].get("mom")
        self.collapsed_ = [int(k) for k in torch.nonzero(state.log_alpha.exp() < COLLAPSE_WEIGHT).flatten()]
        self._warn()
        head.fit_info = {
            "n_tokens": problem.n_tokens,
            "n_distinct": problem.counts.n_distinct,
            "loglik_per_token": self.lower_bound_,
            "objective_per_token": self.objective_,
            "ridge": self.ridge,
            "n_iter": self.n_iter_,
            "converged": self.converged_,
            "stop": self.stop_reason_,
            "m_step": self.m_step_,
            **({"polish": self.polish_} if self.polish_ else {}),
            **({"moves": self.moves_} if self.moves_ else {}),
            "init": self.init if isinstance(self.init, str) else "given",
            "n_init": len(self.init_names_),
            "best_init": self.init_names_[self.best_init_],
            **({"init_fallback": self.init_info_["fallback"]} if "fallback" in self.init_info_ else {}),
            "collapsed": self.collapsed_,
        }
        return head

    def _warn(self) -> None:
        if self.collapsed_:
            warnings.warn(
                f"components {self.collapsed_} collapsed (weight < {COLLAPSE_WEIGHT:g}): the data support fewer than "
                f"{self.n_components} components; consider a smaller n_components",
                RuntimeWarning,
                stacklevel=5,
            )
        if not self.converged_ and self.stop_reason_ != "decrease":
            budget = f"polish_iter={self.polish_iter}" if self.polish_ else f"max_iter={self.max_iter}"
            warnings.warn(
                f"EMFitter stopped on its iteration budget ({budget}) before the per-token gain fell below "
                f"tol={self.tol:g}; raise {budget.split('=')[0]} or tol if the fit matters at that precision",
                ConvergenceWarning,
                stacklevel=5,
            )

    # ------------------------------------------------------------------ scores
    def _fitted(self) -> SoftmaxMixtureHead:
        if not hasattr(self, "head_"):
            raise RuntimeError("this EMFitter is not fitted yet; call fit(...) first")
        return self.head_

    def score(self, counts: Tensor | TokenCounts | None = None, *, tokens: Tensor | None = None) -> float:
        """Per-token log-likelihood of the fitted head on ``counts`` (``(p,)``) or ``tokens=`` (higher is better)."""
        head = self._fitted()
        data = as_counts(tokens, counts, head.vocab_size)
        return float(head.loglik(data)) / data.total

    def _criteria(self, counts, tokens) -> dict[str, float]:
        head = self._fitted()
        data = as_counts(tokens, counts, head.vocab_size)
        return information_criteria(float(head.loglik(data)), head.n_components, head.hidden_size, data.total)

    def bic(self, counts: Tensor | TokenCounts | None = None, *, tokens: Tensor | None = None) -> float:
        """Bayesian information criterion on the data (lower is better): ``-2 loglik + k log N``."""
        return self._criteria(counts, tokens)["bic"]

    def aic(self, counts: Tensor | TokenCounts | None = None, *, tokens: Tensor | None = None) -> float:
        """Akaike information criterion on the data (lower is better): ``-2 loglik + 2 k``."""
        return self._criteria(counts, tokens)["aic"]


#: Deprecated: the settings that were once needed for language-model designs. ``EMFitter``'s own defaults now
#: cover every design (MoM and k-means starts chosen by likelihood, L-BFGS phase, split-and-merge moves), so
#: this is empty; kept so that ``EMFitter(K, **LM_FIT_DEFAULTS)`` still works.
LM_FIT_DEFAULTS: dict[str, Any] = {}


def lm_fitter(n_components: int, **overrides: Any) -> EMFitter:
    """Deprecated: use ``EMFitter(n_components, **overrides)``; its defaults are meant for LM designs too."""
    warnings.warn("lm_fitter is deprecated: EMFitter(n_components) has one default for every design; use it",
                  DeprecationWarning, stacklevel=2)  # fmt: skip
    return EMFitter(n_components, **overrides)
