"""EMFitter: exact EM for softmax mixtures on counts (MATH.md §3), scikit-learn style.

One fit loop (:meth:`EMFitter._run`), an E-step and an M-step as small methods, fitted
attributes with trailing underscores. The E-step reduces the counts to the sufficient
statistics ``W (K,)`` and ``S1 (K, L)`` on the support of the counts; the M-step sets
``alpha = W / N`` exactly and takes damped Newton steps on each atom. The objective

    F(theta) = loglik(theta) - (lam / 2) sum_k ||beta_k||^2,      lam = ridge * N

never decreases (checked every iteration; with ``ridge=0`` it is the log-likelihood).
"""

from __future__ import annotations

import math
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
from .mstep import newton_m_step

INIT_CHOICES = ("random",)
M_STEPS = ("newton",)


@dataclass
class _State:
    """Parameters of one EM run, with the moments of the atoms (``order=2``) cached."""

    log_alpha: Tensor  # (K,)
    beta: Tensor  # (K, L)
    moments: kernels.SoftmaxMoments


class EMFitter:
    """Fit a :class:`SoftmaxMixtureHead` by EM from token ids or counts.

    Args:
        n_components: ``K >= 1``.
        init: ``"random"``; or a :class:`SoftmaxMixtureHead` or a dict with ``"alpha" (K,)`` and
            ``"beta" (K, L)`` to start from (an oracle start when given the truth).
        n_init: number of starts (random draws); the one with the best objective is kept.
        init_max_iter: if set, each of the ``n_init`` starts is run this many iterations and only the
            best is continued to convergence (screening); if ``None`` each start runs to convergence.
        max_iter: maximum EM iterations of the final run.
        tol: stop when the per-token objective rises by less than ``tol`` in an iteration.
        ridge: per-token ridge; the penalty is ``lam = ridge * N`` (MATH.md §3). ``0`` allowed.
        m_step: ``"newton"`` (full Newton with backtracking).
        m_step_iter: Newton steps per M-step (1 = generalised EM).
        random_state: seed (int) or ``torch.Generator`` for the random starts.
        device: where to compute (default: the embedding's device). The embedding is moved
            (copied) only if it lives elsewhere.
        dtype: compute / parameter dtype (default float32 for half-precision embeddings, else the
            embedding's). Likelihoods are accumulated in float64 regardless.
        progress: show a progress bar (tqdm).
        chunk_size: rows of ``X`` per chunk (default automatic).

    Fitted attributes: ``head_``, ``converged_``, ``n_iter_``, ``lower_bound_`` (per-token
    log-likelihood of the fit), ``objective_`` (per-token penalised objective), ``history_``
    (a dict per iteration), ``init_results_`` (final per-token objective of each start),
    ``best_init_`` (index of the start kept), ``n_tokens_``.
    """

    def __init__(
        self,
        n_components: int,
        init: str | SoftmaxMixtureHead | dict = "random",
        n_init: int = 1,
        init_max_iter: int | None = None,
        max_iter: int = 300,
        tol: float = 1e-9,
        ridge: float = 1e-6,
        m_step: str = "newton",
        m_step_iter: int = 1,
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
        self.max_iter = max_iter
        self.tol = tol
        self.ridge = ridge
        self.m_step = m_step
        self.m_step_iter = m_step_iter
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
        pos_int("init_max_iter", self.init_max_iter, allow_none=True)
        for name in ("tol", "ridge"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.m_step not in M_STEPS:
            raise ValueError(f"m_step must be one of {M_STEPS}, got {self.m_step!r}")
        if isinstance(self.init, str) and self.init not in INIT_CHOICES:
            raise ValueError(
                f"init must be one of {INIT_CHOICES}, a SoftmaxMixtureHead or a dict with 'alpha' and 'beta'; "
                f"got {self.init!r}"
            )
        if not isinstance(self.init, (str, dict, SoftmaxMixtureHead)):
            raise TypeError(f"init must be a string, a SoftmaxMixtureHead or a dict, got {type(self.init).__name__}")

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
        if alpha.shape != (K,) or beta.shape != (K, L):
            raise ValueError(
                f"init must hold alpha of shape ({K},) and beta of shape ({K}, {L}); "
                f"got {tuple(alpha.shape)} and {tuple(beta.shape)}"
            )
        return alpha, beta

    def _random_start(self, X: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Atoms ``N(0, I / tr(S))`` so that logits ``x . beta`` have unit spread; uniform weights."""
        K, L = self.n_components, X.shape[1]
        total_var = float(kernels.column_variance(X).sum())
        beta = torch.randn(K, L, generator=gen, dtype=torch.float64) / math.sqrt(max(total_var, 1e-300))
        return torch.full((K,), 1.0 / K, dtype=torch.float64), beta

    # ------------------------------------------------------------------ steps
    def _e_step(self, X, bias, state: _State, counts: TokenCounts) -> kernels.EStepStats:
        return kernels.e_step(
            X, state.beta, state.log_alpha, state.moments.A, counts.support, counts.values, bias, self.chunk_size
        )

    def _m_step(self, X, bias, state: _State, stats: kernels.EStepStats, N: float) -> tuple[_State, dict]:
        log_alpha = torch.log(stats.W) - math.log(stats.W.sum())
        beta, moments, info = newton_m_step(
            X,
            state.beta,
            stats.W,
            stats.S1.to(state.beta.dtype),
            self.ridge * N,
            state.moments,
            bias,
            max_steps=self.m_step_iter,
            tol=0.01 * self.tol * N,
            chunk_size=self.chunk_size,
        )
        return _State(log_alpha.to(state.beta.dtype), beta, moments), {
            "step_sizes": info.step_sizes,
            "passes": info.passes,
        }

    def _objective(self, loglik: Tensor, beta: Tensor, N: float) -> float:
        """Per-token penalised objective ``F / N``."""
        return float(loglik) / N - 0.5 * self.ridge * float((beta.double() ** 2).sum())

    def _run(self, X, bias, counts: TokenCounts, alpha: Tensor, beta: Tensor, max_iter: int, bar=None) -> dict:
        """EM from one start: the final state, its per-token log-likelihood and objective, history."""
        dt, dev = self._dtype, self._device
        N = counts.total
        beta = beta.to(device=dev, dtype=dt)
        log_alpha = torch.log(alpha.to(device=dev, dtype=torch.float64) / alpha.sum()).to(dt)
        state = _State(log_alpha, beta, kernels.softmax_moments(X, beta, bias, order=2, chunk_size=self.chunk_size))
        history: list[dict] = []
        converged = False
        best = None  # (state, loglik, objective) of the last accepted iterate
        t0 = time.perf_counter()
        for it in range(max_iter + 1):
            stats = self._e_step(X, bias, state, counts)
            loglik = float(stats.loglik) / N
            obj = self._objective(stats.loglik, state.beta, N)
            history.append({"iter": it, "loglik": loglik, "objective": obj, "time": time.perf_counter() - t0})
            if best is not None:
                gain = obj - best[2]
                if gain < 0:
                    # EM cannot decrease F: a dip is rounding, or a bug if it is large. Keep the better iterate.
                    rounding = 1e3 * torch.finfo(dt).eps * max(1.0, abs(best[2]))
                    history[-1]["decrease"] = -gain
                    if -gain > rounding:
                        warnings.warn(
                            f"EM objective decreased from {best[2]:.12g} to {obj:.12g} per token at iteration {it}; "
                            "stopping at the previous iterate. Please report this with the data that trigger it.",
                            RuntimeWarning,
                            stacklevel=3,
                        )
                    converged = -gain <= rounding
                    break
                if gain < self.tol:
                    converged = True
                    best = (state, loglik, obj)
                    break
            best = (state, loglik, obj)
            if it == max_iter:
                break
            state, info = self._m_step(X, bias, state, stats, N)
            history[-1].update(info)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loglik=f"{loglik:.6f}")
        state, loglik, obj = best
        return {
            "state": state,
            "history": history,
            "converged": converged,
            "n_iter": len(history) - 1,
            "objective": obj,
            "loglik": loglik,
        }

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
        X = X.to(self._device)
        bias = None if bias is None else bias.to(self._device)
        if not torch.isfinite(kernels.column_variance(X)).all():
            raise ValueError("embedding contains NaN or infinite values")
        data = as_counts(tokens, counts, X.shape[0]).to(self._device)
        N = data.total
        gen = self._generator()

        if isinstance(self.init, str):
            starts = [self._random_start(X, gen) for _ in range(self.n_init)]
        else:
            starts = [self._explicit_start(X.shape[1])]
        screen = self.init_max_iter is not None and len(starts) > 1
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            total = self.max_iter + (len(starts) * self.init_max_iter if screen else 0)
            bar = tqdm(total=total, desc=f"EM K={self.n_components}", unit="it")
        try:
            results = []
            for alpha, beta in starts:
                results.append(
                    self._run(X, bias, data, alpha, beta, self.init_max_iter if screen else self.max_iter, bar)
                )
            best = max(range(len(results)), key=lambda i: results[i]["objective"])
            self.init_results_ = [r["objective"] for r in results]
            self.best_init_ = best
            result = results[best]
            if screen:
                st = result["state"]
                result = self._run(X, bias, data, st.log_alpha.exp(), st.beta, self.max_iter, bar)
        finally:
            if bar is not None:
                bar.close()

        state = result["state"]
        head = SoftmaxMixtureHead(X, self.n_components, bias, dtype=self._dtype, chunk_size=self.chunk_size)
        with torch.no_grad():
            head.log_alpha.copy_(state.log_alpha)
            head.beta.copy_(state.beta)
        self.head_ = head
        self.converged_ = bool(result["converged"])
        self.n_iter_ = int(result["n_iter"])
        self.lower_bound_ = float(result["loglik"])
        self.objective_ = float(result["objective"])
        self.history_ = result["history"]
        self.n_tokens_ = N
        head.fit_info = {
            "n_tokens": N,
            "n_distinct": data.n_distinct,
            "loglik_per_token": self.lower_bound_,
            "objective_per_token": self.objective_,
            "ridge": self.ridge,
            "n_iter": self.n_iter_,
            "converged": self.converged_,
            "init": self.init if isinstance(self.init, str) else "given",
            "n_init": len(starts),
        }
        return head
