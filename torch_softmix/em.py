"""EMFitter: exact EM for softmax mixtures on counts (MATH.md §3), scikit-learn style.

One fit loop (:meth:`EMFitter._run`), an E-step and an M-step as small methods, fitted
attributes with trailing underscores. The E-step reduces the counts to the sufficient
statistics ``W (K,)`` and ``S1 (K, L)`` on the support of the counts; the M-step sets
``alpha = W / N`` exactly and takes damped Newton steps on each atom. The objective

    F(theta) = loglik(theta) - (lam / 2) sum_k ||beta_k||^2,      lam = ridge * N

never decreases (checked every iteration; with ``ridge=0`` it is the log-likelihood).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .data import TokenCounts, as_counts
from .head import SoftmaxMixtureHead, _check_design, _param_dtype
from .io import embedding_fingerprint, read_checkpoint, write_checkpoint
from .moments import Whitening, latent_moments, mom_estimate, subspace_starts
from .mstep import AUTO_NEWTON_MAX_L, M_STEPS, AtomState, newton_m_step
from .polish import polish
from .starts import kmeans_start, random_start

INIT_CHOICES = ("mom", "subspace", "kmeans", "random")
MOM_METHODS = ("tensor", "univariate")
#: Subspace starts used when the MoM estimate is unusable and fewer starts were asked for.
FALLBACK_STARTS = 10
ACCELERATIONS = (None, "squarem")
#: Extrapolation lengths tried by SQUAREM before it settles for the plain EM iterate.
SQUAREM_BACKTRACKS = 8
#: A component whose weight falls below this has collapsed (reported in ``collapsed_`` and a warning).
COLLAPSE_WEIGHT = 1e-8


@dataclass
class _State:
    """Parameters of one EM run: ``log_alpha (K,)`` float64 and the atoms with their cached logits."""

    log_alpha: Tensor
    atoms: AtomState


@dataclass
class _Point:
    """A state with its E-step: statistics, per-token log-likelihood and penalised objective."""

    state: _State
    stats: kernels.EStepStats
    loglik: float
    objective: float


class EMFitter:
    """Fit a :class:`SoftmaxMixtureHead` by EM from token ids or counts.

    Args:
        n_components: ``K >= 1``.
        init: where EM starts (MATH.md §4):

            * ``"mom"`` (default): the method-of-moments estimate from latent moments, plus
              ``n_init - 1`` subspace starts. If the moments are unusable (``K`` above the usable
              rank, too few tokens, invalid solutions) it falls back to ``max(n_init, 10)``
              subspace starts and records why in ``init_info_``.
            * ``"subspace"``: ``n_init`` random atoms inside the top-``K`` eigenspace of ``M2``,
              scaled from ``trace(M2)``, uniform weights (the paper's restarts).
            * ``"kmeans"``: ``n_init`` starts from count-weighted spherical k-means of the most frequent
              tokens' whitened embeddings, each cluster given its moment-matched atom (see
              :func:`~torch_softmix.starts.kmeans_start`). The best start on real LLM embeddings so far.
            * ``"random"``: ``n_init`` atoms ``N(0, I / tr(Cov X))``, uniform weights.
            * a :class:`SoftmaxMixtureHead` or a dict with ``"alpha" (K,)`` and ``"beta" (K, L)``:
              a warm start (an oracle start when given the truth).
        n_init: number of starts; the one with the best objective is kept.
        init_max_iter: with several starts, each is run this many EM iterations and only the best
            is continued to convergence (screening); ``None`` runs every start to convergence.
        mom_method: ``"tensor"`` (third moment, Jennrich) or ``"univariate"`` (the paper's Hermite
            moments along directions) for ``init="mom"``.
        max_iter: maximum EM iterations of the final run.
        tol: stop when the per-token objective rises by less than ``tol`` in an iteration.
        ridge: per-token ridge; the penalty is ``lam = ridge * N`` (MATH.md §3). ``0`` allowed.
        m_step: ``"newton"`` (full Newton: ``K`` Hessians of size ``L x L``), ``"newton-cg"``
            (Hessian-vector products, no ``L x L`` matrix) or ``"auto"`` (full Newton for
            ``L <= 64``, Newton-CG above). Both use a backtracking line search and are monotone.
        m_step_iter: Newton steps per M-step (1 = generalised EM).
        cg_max_iter, cg_rtol: conjugate-gradient budget and relative residual for ``"newton-cg"``.
        accelerate: ``"squarem"`` (default) extrapolates every two EM iterations (SQUAREM) and keeps
            the extrapolation only if its objective is at least the plain EM iterate's, so the fit
            stays monotone; ``None`` runs plain EM.
        polish_iter: after EM, up to this many L-BFGS iterations on the marginal likelihood
            (:func:`~torch_softmix.polish.polish`, float64, whitened atoms); ``0`` (default) skips it.
            Worth it where EM creeps because components share tokens (LM next-token mixtures); the
            polished point is kept only if its objective is at least EM's. Not checkpointed (it reruns
            after a resumed EM).
        checkpoint: a file to save the run to every ``checkpoint_every`` EM iterations (atomically).
            If it exists when ``fit`` starts, the fit resumes from it (after checking that the design,
            the counts and the settings are the same) and ends with the same result as an
            uninterrupted fit (bit-exact on CPU). With several starts, the checkpoint covers the run
            continued after screening.
        random_state: seed (int) or ``torch.Generator`` for the random starts.
        device: where to compute (default: the embedding's device). The embedding is moved
            (copied) only if it lives elsewhere.
        dtype: compute / parameter dtype (default float32 for half-precision embeddings, else the
            embedding's). Likelihoods are accumulated in float64 regardless.
        progress: show a progress bar (tqdm).
        chunk_size: rows of ``X`` per chunk (default automatic).

    Fitted attributes: ``head_``, ``converged_``, ``n_iter_``, ``lower_bound_`` (per-token
    log-likelihood of the fit), ``objective_`` (per-token penalised objective), ``history_``
    (a dict per iteration, the winning start's screening iterations included),
    ``collapsed_`` (components whose weight fell below 1e-8), ``init_names_`` (each start's name: ``"mom"``, ``"subspace-3"``, ...), ``init_results_`` and
    ``init_logliks_`` (per-token objective and log-likelihood each start reached), ``best_init_``
    (index of the start kept), ``init_info_`` (MoM diagnostics, fallback reason), ``mom_``
    (the :class:`~torch_softmix.moments.MoMResult`, for ``init="mom"``), ``n_tokens_``, ``polish_``
    (with ``polish_iter > 0``: L-BFGS iterations, evaluations, objective before and after, whether kept).
    """

    def __init__(
        self,
        n_components: int,
        init: str | SoftmaxMixtureHead | dict = "mom",
        n_init: int = 1,
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
        polish_iter: int = 0,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        random_state: int | torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        self.n_components = n_components
        self.init = init
        self.n_init = n_init
        self.init_max_iter = init_max_iter
        self.mom_method = mom_method
        self.max_iter = max_iter
        self.tol = tol
        self.ridge = ridge
        self.m_step = m_step
        self.m_step_iter = m_step_iter
        self.cg_max_iter = cg_max_iter
        self.cg_rtol = cg_rtol
        self.accelerate = accelerate
        self.polish_iter = polish_iter
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.checkpoint_every = checkpoint_every
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.progress = progress
        self.chunk_size = chunk_size

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        def pos_int(name: str, value: Any, allow_none: bool = False) -> None:
            if allow_none and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

        pos_int("n_components", self.n_components)
        pos_int("n_init", self.n_init)
        pos_int("max_iter", self.max_iter)
        pos_int("m_step_iter", self.m_step_iter)
        pos_int("cg_max_iter", self.cg_max_iter)
        pos_int("checkpoint_every", self.checkpoint_every)
        if isinstance(self.polish_iter, bool) or not isinstance(self.polish_iter, int) or self.polish_iter < 0:
            raise ValueError(f"polish_iter must be an int >= 0 (0: no polish), got {self.polish_iter!r}")
        if self.checkpoint is not None and self.n_init > 1 and self.init_max_iter is None:
            raise ValueError("checkpoint needs init_max_iter (screened starts) when n_init > 1")
        pos_int("init_max_iter", self.init_max_iter, allow_none=True)
        for name in ("tol", "ridge", "cg_rtol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.accelerate not in ACCELERATIONS:
            raise ValueError(f"accelerate must be one of {ACCELERATIONS}, got {self.accelerate!r}")
        if self.mom_method not in MOM_METHODS:
            raise ValueError(f"mom_method must be one of {MOM_METHODS}, got {self.mom_method!r}")
        if self.m_step not in M_STEPS:
            raise ValueError(f"m_step must be one of {M_STEPS}, got {self.m_step!r}")
        if isinstance(self.init, str) and self.init not in INIT_CHOICES:
            raise ValueError(
                f"init must be one of {INIT_CHOICES}, a SoftmaxMixtureHead or a dict with 'alpha' and 'beta'; "
                f"got {self.init!r}"
            )
        if not isinstance(self.init, (str, dict, SoftmaxMixtureHead)):
            raise TypeError(f"init must be a string, a SoftmaxMixtureHead or a dict, got {type(self.init).__name__}")
        if self.dtype is not None and self.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"dtype must be torch.float32 or torch.float64 (the compute dtype; half-precision embeddings are "
                f"read in chunks and computed in float32), got {self.dtype}"
            )
        pos_int("chunk_size", self.chunk_size, allow_none=True)
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device {self.device!r} is not a torch device: {err}") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device={self.device!r} but CUDA is not available here; use device='cpu' or None")
        if not (
            self.random_state is None
            or isinstance(self.random_state, torch.Generator)
            or (isinstance(self.random_state, int) and not isinstance(self.random_state, bool))
        ):
            raise TypeError(f"random_state must be None, an int or a torch.Generator, got {self.random_state!r}")

    def _generator(self) -> torch.Generator:
        if isinstance(self.random_state, torch.Generator):
            return self.random_state
        gen = torch.Generator()
        gen.manual_seed(int(self.random_state) if self.random_state is not None else torch.seed())
        return gen

    # ------------------------------------------------------------------ starts
    def _explicit_start(self, L: int) -> tuple[Tensor, Tensor]:
        init = self.init
        if isinstance(init, SoftmaxMixtureHead):
            alpha, beta = init.alpha.detach(), init.beta.detach()
        else:
            missing = {"alpha", "beta"} - set(init)
            if missing:
                raise ValueError(f"init dict lacks {sorted(missing)}; give 'alpha' (K,) and 'beta' (K, L)")
            alpha, beta = torch.as_tensor(init["alpha"]), torch.as_tensor(init["beta"])
        K = self.n_components
        alpha, beta = alpha.to(torch.float64), beta.to(torch.float64)
        if not torch.isfinite(alpha).all() or (alpha < 0).any() or float(alpha.sum()) <= 0:
            raise ValueError(f"init alpha must be finite, non-negative and not all zero, got {alpha.tolist()}")
        if not torch.isfinite(beta).all():
            raise ValueError("init beta contains NaN or infinite values")
        if alpha.shape != (K,) or beta.shape != (K, L):
            raise ValueError(
                f"init must hold alpha of shape ({K},) and beta of shape ({K}, {L}); "
                f"got {tuple(alpha.shape)} and {tuple(beta.shape)}"
            )
        return alpha, beta

    def _whitening(self, X: Tensor) -> Whitening:
        """The design's whitening, cached across fits on the same, unmodified tensor."""
        key = (X.data_ptr(), tuple(X.shape), X.dtype, X.device, X._version)
        cached = getattr(self, "_whitening_cache", None)
        if cached is None or cached[0] != key:
            self._whitening_cache = (key, Whitening.from_design(X, self.chunk_size))
        return self._whitening_cache[1]

    def _starts(self, X: Tensor, data: TokenCounts, gen: torch.Generator) -> list[tuple[str, Tensor, Tensor]]:
        """The list of ``(name, alpha (K,), beta (K, L))`` starts that ``init`` asks for."""
        self.init_info_: dict[str, Any] = {}
        self.mom_ = None
        if not isinstance(self.init, str):
            return [("given", *self._explicit_start(X.shape[1]))]
        if self.init == "random":
            return [(f"random-{i}", *random_start(X, self.n_components, gen)) for i in range(self.n_init)]
        whitening = self._whitening(X)
        if self.init == "kmeans":
            return [
                (
                    f"kmeans-{i}",
                    *kmeans_start(
                        X,
                        data,
                        self.n_components,
                        gen,
                        whitening=whitening,
                        bias=self._bias,
                        ridge=self.ridge,
                        dtype=self._dtype,
                        chunk_size=self.chunk_size,
                    ),
                )
                for i in range(self.n_init)
            ]
        lm = latent_moments(X, data, whitening, self.chunk_size)
        n_sub = self.n_init
        starts: list[tuple[str, Tensor, Tensor]] = []
        if self.init == "mom":
            mom = mom_estimate(
                X, data, self.n_components, method=self.mom_method, whitening=whitening, moments=lm, seed=gen
            )
            self.mom_ = mom
            self.init_info_["mom_method"] = self.mom_method
            if mom.ok:
                starts.append(("mom", mom.alpha, mom.beta))
                n_sub = self.n_init - 1
            else:
                self.init_info_["fallback"] = f"MoM unusable ({mom.reason}); used subspace starts"
                warnings.warn(f"init='mom': {self.init_info_['fallback']}", RuntimeWarning, stacklevel=4)
                n_sub = max(self.n_init, FALLBACK_STARTS)
        subs = subspace_starts(lm, whitening, self.n_components, n_sub, gen)
        starts += [(f"subspace-{i}", a, b) for i, (a, b) in enumerate(subs)]
        return starts

    # ------------------------------------------------------------------ steps
    def _e_step(self, X, state: _State, counts: TokenCounts) -> kernels.EStepStats:
        lg = state.atoms.logits.index_select(0, counts.support)
        return kernels.e_step_from_logits(
            X, lg, state.log_alpha, state.atoms.A, counts.support, counts.values, self._dtype, self.chunk_size
        )

    def _m_step(self, X, state: _State, stats: kernels.EStepStats, N: float) -> tuple[_State, dict]:
        log_alpha = torch.log(stats.W) - math.log(N)
        atoms, info = newton_m_step(
            X,
            state.atoms,
            stats.W,
            stats.S1,
            self.ridge * N,
            dtype=self._dtype,
            method=self._m_step_method,
            max_steps=self.m_step_iter,
            tol=0.01 * self.tol * N,
            cg_max_iter=self.cg_max_iter,
            cg_rtol=self.cg_rtol,
            chunk_size=self.chunk_size,
        )
        return _State(log_alpha, atoms), {
            "step_sizes": info.step_sizes,
            "passes": info.passes,
            "cg_iters": info.cg_iters,
        }

    def _objective(self, loglik: Tensor, beta: Tensor, N: float) -> float:
        """Per-token penalised objective ``F / N``."""
        return float(loglik) / N - 0.5 * self.ridge * float((beta.double() ** 2).sum())

    def _evaluate(self, X, state: _State, counts: TokenCounts) -> _Point:
        """E-step at ``state``: its statistics, per-token log-likelihood and objective."""
        stats = self._e_step(X, state, counts)
        N = counts.total
        return _Point(state, stats, float(stats.loglik) / N, self._objective(stats.loglik, state.atoms.beta, N))

    def _em_map(self, X, point: _Point, counts: TokenCounts) -> tuple[_Point, dict]:
        """One EM iteration: M-step from ``point``'s statistics, then the E-step at the new parameters."""
        state, info = self._m_step(X, point.state, point.stats, counts.total)
        return self._evaluate(X, state, counts), info

    def _squarem(self, X, bias, p0: _Point, p1: _Point, p2: _Point, counts: TokenCounts) -> tuple[_Point, float]:
        """SQUAREM (Varadhan & Roland 2008, SqS3) from three EM iterates; never worse than ``p2``.

        ``theta' = theta0 - 2 a r + a^2 v`` with ``r = theta1 - theta0``, ``v = theta2 - 2 theta1 + theta0``,
        ``a = -|r| / |v|``; ``a`` is moved toward ``-1`` (which gives ``theta2``) until the objective at
        ``theta'`` is at least that of ``theta2``. Parameters: ``beta`` and ``log alpha``.
        """

        def flat(p: _Point) -> Tensor:
            return torch.cat([p.state.atoms.beta.flatten(), p.state.log_alpha.clamp_min(-50.0)])

        t0, t1, t2 = flat(p0), flat(p1), flat(p2)
        r, v = t1 - t0, t2 - 2 * t1 + t0
        vv = float(v @ v)
        if vv <= 0 or not math.isfinite(vv):
            return p2, -1.0
        a = -math.sqrt(float(r @ r) / vv)
        K, L = p0.state.atoms.beta.shape
        for _ in range(SQUAREM_BACKTRACKS):
            if a >= -1.0:
                break
            theta = t0 - 2 * a * r + a * a * v
            if bool(torch.isfinite(theta).all()):
                log_alpha = torch.log_softmax(theta[K * L :], 0)
                atoms = AtomState.from_beta(X, theta[: K * L].reshape(K, L), bias, self._dtype, self.chunk_size)
                point = self._evaluate(X, _State(log_alpha, atoms), counts)
                if point.objective >= p2.objective:
                    return point, a
            a = 0.5 * (a - 1.0)
        return p2, -1.0

    def _state(self, X, bias, alpha: Tensor, beta: Tensor) -> _State:
        log_alpha = torch.log(alpha.to(device=self._device, dtype=torch.float64) / alpha.sum())
        return _State(log_alpha, AtomState.from_beta(X, beta, bias, self._dtype, self.chunk_size))

    def _run(
        self,
        X,
        bias,
        counts: TokenCounts,
        state: _State,
        max_iter: int,
        bar=None,
        *,
        history: list[dict] | None = None,
        n_done: int = 0,
        on_point=None,
    ) -> dict:
        """EM from one state: the final state, its per-token log-likelihood and objective, history.

        ``max_iter`` counts EM iterations (M-steps); with ``accelerate="squarem"`` each cycle is two
        EM iterations and an extrapolation that is kept only if it is at least as good. ``history`` and
        ``n_done`` continue an earlier run (resume); ``on_point(state, history, n_maps)`` is called
        after every accepted iterate (checkpoints).
        """
        point = self._evaluate(X, state, counts)
        t0 = time.perf_counter() - (history[-1]["time"] if history else 0.0)
        if history is None:
            history = [{"iter": 0, "loglik": point.loglik, "objective": point.objective, "time": 0.0}]
        converged = False
        n_maps = shown = n_done
        while n_maps < max_iter:
            prev = point
            if self.accelerate == "squarem" and n_maps + 2 <= max_iter:
                p1, info = self._em_map(X, prev, counts)
                p2, _ = self._em_map(X, p1, counts)
                point, a = self._squarem(X, bias, prev, p1, p2, counts)
                n_maps += 2
                info = {**info, "squarem_step": a}
            else:
                point, info = self._em_map(X, prev, counts)
                n_maps += 1
            gain = point.objective - prev.objective
            history.append(
                {
                    "iter": n_maps,
                    "loglik": point.loglik,
                    "objective": point.objective,
                    "time": time.perf_counter() - t0,
                    **info,
                }
            )
            if bar is not None:
                bar.update(n_maps - shown)
                shown = n_maps
                bar.set_postfix(loglik=f"{point.loglik:.6f}")
            if gain < 0:
                # EM cannot decrease F: a dip is rounding, or a bug if it is large. Keep the better iterate.
                rounding = 1e3 * torch.finfo(torch.float64).eps * max(1.0, abs(prev.objective))
                history[-1]["decrease"] = -gain
                if -gain > rounding:
                    warnings.warn(
                        f"EM objective decreased from {prev.objective:.12g} to {point.objective:.12g} per token "
                        f"at iteration {n_maps}; stopping at the previous iterate. Please report this with the "
                        "data that trigger it.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                converged = -gain <= rounding
                point = prev
                break
            if gain < self.tol:
                converged = True
                break
            if on_point is not None:
                on_point(point.state, history, n_maps)
        return {
            "state": point.state,
            "history": history,
            "converged": converged,
            "n_iter": n_maps,
            "objective": point.objective,
            "loglik": point.loglik,
        }

    def _polish(self, X, bias, data: TokenCounts, result: dict) -> dict:
        """L-BFGS on the marginal likelihood from EM's final state; kept only if it is at least as good."""
        t0 = time.perf_counter()
        state = result["state"]
        pr = polish(
            X,
            data,
            state.atoms.beta,
            state.log_alpha,
            self.ridge * data.total,
            self._whitening(X),
            bias=bias,
            max_iter=self.polish_iter,
            tol=self.tol,
            chunk_size=self.chunk_size,
        )
        point = self._evaluate(X, self._state(X, bias, pr.log_alpha.exp(), pr.beta), data)
        kept = point.objective >= result["objective"]
        self.polish_ = {
            "n_iter": pr.n_iter,
            "n_evals": pr.n_evals,
            "converged": pr.converged,
            "objective_before": result["objective"],
            "objective_after": point.objective,
            "kept": kept,
            "seconds": time.perf_counter() - t0,
        }
        history = result["history"]
        history.append(
            {
                "iter": result["n_iter"],
                "loglik": point.loglik,
                "objective": point.objective,
                "time": history[-1]["time"] + self.polish_["seconds"],
                "phase": "polish",
                "polish_iter": pr.n_iter,
                "polish_evals": pr.n_evals,
            }
        )
        if not kept:
            return result
        return {
            **result,
            "state": point.state,
            "objective": point.objective,
            "loglik": point.loglik,
            "converged": result["converged"] or pr.converged,
        }

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_key(self, X: Tensor, data: TokenCounts) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the design, the data and the fit's settings."""
        digest = hashlib.sha256()
        digest.update(data.support.cpu().numpy().tobytes())
        digest.update(data.values.cpu().numpy().tobytes())
        settings = {
            k: getattr(self, k)
            for k in ("n_components", "ridge", "tol", "m_step", "m_step_iter", "cg_max_iter", "cg_rtol", "accelerate")
        }
        return {
            "embedding_fingerprint": embedding_fingerprint(X),
            "counts_sha256": digest.hexdigest()[:32],
            "settings": json.dumps(settings, sort_keys=True, default=str),
            "dtype": str(self._dtype),
        }

    def _checkpointer(self, X: Tensor, data: TokenCounts):
        """A callback writing the run's state every ``checkpoint_every`` iterations (atomically)."""
        if self.checkpoint is None:
            return None
        key = self._checkpoint_key(X, data)
        last = [-1]

        def save(state: _State, history: list[dict], n_maps: int) -> None:
            if last[0] >= 0 and n_maps - last[0] < self.checkpoint_every:
                return
            last[0] = n_maps
            meta = {
                **key,
                "n_maps": n_maps,
                "history": history,
                "init_names": getattr(self, "init_names_", None),
                "init_results": getattr(self, "init_results_", None),
                "init_logliks": getattr(self, "init_logliks_", None),
                "best_init": getattr(self, "best_init_", 0),
            }
            write_checkpoint(
                self.checkpoint,
                {
                    "log_alpha": state.log_alpha,
                    "beta": state.atoms.beta,
                    "logits": state.atoms.logits,
                    "A": state.atoms.A,
                },
                meta,
            )

        return save

    def _read_checkpoint(self, X: Tensor, data: TokenCounts):
        """The saved ``(state, history, n_maps, meta)`` if ``checkpoint`` exists and matches this fit."""
        if not os.path.exists(self.checkpoint):
            return None
        tensors, meta = read_checkpoint(self.checkpoint)
        key = self._checkpoint_key(X, data)
        for name, value in key.items():
            if meta.get(name) != value:
                raise ValueError(
                    f"checkpoint {self.checkpoint!r} belongs to another fit ({name} differs); delete it or pass "
                    "another checkpoint path"
                )
        dev = self._device
        state = _State(
            tensors["log_alpha"].to(dev),
            AtomState(tensors["beta"].to(dev), tensors["logits"].to(dev), tensors["A"].to(dev)),
        )
        if meta["init_names"] is None:  # saved during the single start itself
            meta["init_names"], meta["init_results"], meta["init_logliks"] = ["resumed"], [float("nan")], [float("nan")]
        return state, meta["history"], int(meta["n_maps"]), meta

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit(
        self,
        embedding_or_head: Tensor | SoftmaxMixtureHead,
        *,
        tokens: Tensor | Iterable[Tensor] | None = None,
        counts: Tensor | TokenCounts | None = None,
        bias: Tensor | None = None,
    ) -> SoftmaxMixtureHead:
        """Fit the mixture to ``tokens`` (ids, any shape, or shards) or ``counts`` (``(p,)``).

        ``embedding_or_head`` is the design ``X (p, L)`` or a head whose embedding and bias are
        used. Returns the fitted head (also ``self.head_``), sharing that embedding's storage.
        """
        self._check_params()
        if isinstance(embedding_or_head, SoftmaxMixtureHead):
            if bias is not None:
                raise ValueError("bias is taken from the head; do not pass bias= with a head")
            X, bias = embedding_or_head.embedding, embedding_or_head.bias
        else:
            X, bias = _check_design(embedding_or_head, bias)
        self._device = torch.device(self.device) if self.device is not None else X.device
        self._dtype = _param_dtype(X, self.dtype)
        if self.m_step == "auto":
            self._m_step_method = "newton" if X.shape[1] <= AUTO_NEWTON_MAX_L else "newton-cg"
        else:
            self._m_step_method = self.m_step
        X = X.to(self._device)
        bias = None if bias is None else bias.to(self._device)
        self._bias = bias
        if not torch.isfinite(kernels.column_variance(X)).all():
            raise ValueError("embedding contains NaN or infinite values; check the model's output layer")
        if bias is not None and not torch.isfinite(bias).all():
            raise ValueError("bias contains NaN or infinite values")
        data = as_counts(tokens, counts, X.shape[0]).to(self._device)
        if data.n_distinct < self.n_components:
            raise ValueError(
                f"n_components={self.n_components} is larger than the {data.n_distinct} distinct tokens seen: the "
                "mixture is not identifiable; sample more tokens or lower n_components"
            )
        N = data.total
        gen = self._generator()

        starts = self._starts(X, data, gen)
        screen = self.init_max_iter is not None and len(starts) > 1
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            total = self.max_iter + (len(starts) * self.init_max_iter if screen else 0)
            bar = tqdm(total=total, desc=f"EM K={self.n_components}", unit="it")
        try:
            resumed = self._read_checkpoint(X, data) if self.checkpoint is not None else None
            if resumed is not None:
                state, history, n_done, meta = resumed
                self.init_names_, self.init_results_ = meta["init_names"], meta["init_results"]
                self.init_logliks_, self.best_init_ = meta["init_logliks"], meta["best_init"]
                result = self._run(
                    X,
                    bias,
                    data,
                    state,
                    self.max_iter,
                    bar,
                    history=history,
                    n_done=n_done,
                    on_point=self._checkpointer(X, data),
                )
            else:
                results = []
                for _, alpha, beta in starts:
                    run_iter = self.init_max_iter if screen else self.max_iter
                    saver = self._checkpointer(X, data) if len(starts) == 1 else None
                    results.append(
                        self._run(X, bias, data, self._state(X, bias, alpha, beta), run_iter, bar, on_point=saver)
                    )
                best = max(range(len(results)), key=lambda i: results[i]["objective"])
                self.init_names_ = [name for name, _, _ in starts]
                self.init_results_ = [r["objective"] for r in results]
                self.init_logliks_ = [r["loglik"] for r in results]
                self.best_init_ = best
                result = results[best]
                if screen:
                    result = self._run(
                        X,
                        bias,
                        data,
                        result["state"],
                        self.max_iter,
                        bar,
                        history=result["history"],
                        n_done=result["n_iter"],
                        on_point=self._checkpointer(X, data),
                    )
        finally:
            if bar is not None:
                bar.close()

        self.polish_ = None
        if self.polish_iter > 0:
            result = self._polish(X, bias, data, result)
        state = result["state"]
        head = SoftmaxMixtureHead(X, self.n_components, bias, dtype=self._dtype, chunk_size=self.chunk_size)
        with torch.no_grad():
            head.log_alpha.copy_(state.log_alpha)
            head.beta.copy_(state.atoms.beta)
        self.head_ = head
        self.converged_ = bool(result["converged"])
        self.n_iter_ = int(result["n_iter"])
        self.lower_bound_ = float(result["loglik"])
        self.objective_ = float(result["objective"])
        self.history_ = result["history"]
        self.n_tokens_ = N
        weights = state.log_alpha.exp()
        self.collapsed_ = [int(k) for k in torch.nonzero(weights < COLLAPSE_WEIGHT).flatten()]
        if self.collapsed_:
            warnings.warn(
                f"components {self.collapsed_} collapsed (weight < {COLLAPSE_WEIGHT:g}): the data support fewer than "
                f"{self.n_components} components; consider a smaller n_components",
                RuntimeWarning,
                stacklevel=3,
            )
        head.fit_info = {
            "n_tokens": N,
            "n_distinct": data.n_distinct,
            "loglik_per_token": self.lower_bound_,
            "objective_per_token": self.objective_,
            "ridge": self.ridge,
            "n_iter": self.n_iter_,
            "converged": self.converged_,
            **({"polish": self.polish_} if self.polish_ else {}),
            "init": self.init if isinstance(self.init, str) else "given",
            "n_init": len(starts),
            "best_init": self.init_names_[self.best_init_],
            **({"init_fallback": self.init_info_["fallback"]} if "fallback" in self.init_info_ else {}),
            "collapsed": self.collapsed_,
        }
        return head
