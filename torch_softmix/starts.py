"""Where EM starts: one registry of start makers, each with the same signature (docs/MATH.md §4).

    starts, info = make_starts("kmeans", StartRequest(design, counts, n_components=4, n_init=6, generator=gen))

Each maker takes a :class:`StartRequest` and returns a list of :class:`Start` (a name, weights
``alpha (K,)`` and atoms ``beta (K, L)``, float64) and a dict of diagnostics:

* ``"mom"``: the method-of-moments estimate from latent moments, plus ``n_init - 1`` subspace starts;
  when the moments are unusable it falls back to ``max(n_init, 10)`` subspace starts (warned, and
  the reason is in the diagnostics).
* ``"subspace"``: random atoms inside the top-``K`` eigenspace of the second latent moment.
* ``"kmeans"``: count-weighted spherical k-means of the most frequent tokens' whitened embeddings,
  each cluster given its moment-matched atom (as scikit-learn's ``GaussianMixture(init_params="kmeans")``).
* ``"random"``: atoms ``N(0, I / tr(Cov X))``, uniform weights.

A head or a dict ``{"alpha", "beta"}`` given as the start is checked by :func:`given_start`.
New makers are added with :func:`register_start`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .data import TokenCounts
from .design import Design
from .mom import mom_estimate
from .moments import latent_moments, subspace_starts
from .mstep import AtomState, newton_m_step
from .validation import check_finite, check_simplex

MOM_METHODS = ("tensor", "univariate")
#: Subspace starts used when the MoM estimate is unusable and fewer starts were asked for.
FALLBACK_STARTS = 10


def random_start(
    X: Tensor, n_components: int, gen: torch.Generator, total_var: float | None = None
) -> tuple[Tensor, Tensor]:
    """``alpha (K,)`` uniform and atoms ``(K, L)`` drawn ``N(0, I / tr(Cov X))`` (logits of unit spread).

    ``total_var`` is ``tr(Cov X)`` when known (a :class:`~torch_softmix.design.Design` caches it).
    """
    total_var = float(kernels.column_variance(X).sum()) if total_var is None else total_var
    beta = torch.randn(n_components, X.shape[1], generator=gen, dtype=torch.float64) / math.sqrt(max(total_var, 1e-300))
    return torch.full((n_components,), 1.0 / n_components, dtype=torch.float64), beta


def frequent_rows(
    X: Tensor, counts: TokenCounts, top: int, comm=None, offset: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """The global ids ``(T,)`` (int64), counts ``(T,)`` and rows ``(T, L)`` (float64) of the ``top`` most frequent
    tokens, ties broken by id.

    With a ``comm`` over several ranks each rank proposes its own ``top`` and the global ones are kept, in
    the same order as a single process would find them.
    """
    _, order = torch.sort(counts.values, descending=True, stable=True)  # support is sorted: ties by id
    order = order[:top]
    ids = (counts.support[order] + offset).to(torch.float64)
    local = torch.cat([ids[:, None], counts.values[order, None], X.index_select(0, counts.support[order]).double()], 1)
    if comm is not None and comm.distributed:
        every = torch.cat(comm.gather(local, "frequent_rows"))
        every = every[torch.argsort(every[:, 0])]  # by id, then stably by count
        _, order = torch.sort(every[:, 1], descending=True, stable=True)
        local = every[order[:top]]
    return local[:, 0].long(), local[:, 1], local[:, 2:]


def weighted_kmeans(Y: Tensor, w: Tensor, K: int, gen: torch.Generator, n_iter: int = 30) -> tuple[Tensor, Tensor]:
    """Count-weighted spherical k-means of the rows of ``Y (S, d)`` with weights ``w (S,)``.

    k-means++ seeding (a row drawn with probability ``w``, then with ``w × distance²``), then Lloyd
    steps on unit vectors. Returns the labels ``(S,)`` and the centres ``(K, d)``.
    """
    U = Y / Y.norm(dim=1, keepdim=True).clamp_min(1e-12)
    S = U.shape[0]
    first = int(torch.multinomial(w.cpu().double(), 1, generator=gen))
    centres = [U[first]]
    d2 = (2 - 2 * U @ U[first]).clamp_min(0)
    for _ in range(1, K):
        prob = (w * d2).cpu().double()
        if float(prob.sum()) <= 0:
            prob = w.cpu().double()
        nxt = int(torch.multinomial(prob, 1, generator=gen))
        centres.append(U[nxt])
        d2 = torch.minimum(d2, (2 - 2 * U @ U[nxt]).clamp_min(0))
    C = torch.stack(centres)
    labels = torch.zeros(S, dtype=torch.long, device=U.device)
    for _ in range(n_iter):
        new = (U @ C.T).argmax(dim=1)
        if torch.equal(new, labels) and _ > 0:
            break
        labels = new
        sums = torch.zeros_like(C).index_add_(0, labels, U * w[:, None])
        empty = sums.norm(dim=1) == 0
        C = torch.where(empty[:, None], C, sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return labels, C


#: Atoms moment-matched together by :func:`kmeans_starts` (one Newton solve over ``X`` for all of them): their
#: cached logits are ``p x`` this many float64.
KMEANS_BATCH_ATOMS = 64


def kmeans_starts(
    X: Tensor,
    counts: TokenCounts,
    n_components: int,
    n_starts: int,
    gen: torch.Generator,
    *,
    whitening=None,
    bias: Tensor | None = None,
    top: int = 300,
    ridge: float = 1e-6,
    dtype: torch.dtype = torch.float32,
    newton_steps: int = 8,
    chunk_size: int | None = None,
    comm=None,
    offset: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """``n_starts`` pairs ``(alpha (K,), beta (K, L))`` from count-weighted spherical k-means of the ``top`` most
    frequent tokens' whitened embeddings (``whitening``: a :class:`~torch_softmix.moments.Whitening`), one
    k-means++ draw per start.

    Each atom is the ridge-penalised moment match of its cluster: ``m(beta_k) ~ mean embedding of the
    cluster``. The matches of all starts are solved together, :data:`KMEANS_BATCH_ATOMS` atoms per Newton
    solve (each step's products over ``X`` then carry many columns at once, which costs far less than one
    solve per start). On SmolLM2 next-token mixtures the clusters of the 300 most frequent tokens were ~90% pure
    (mass-weighted) against the true components, against ~70% for raw embeddings. With a ``comm`` over
    several ranks, ``X`` and ``counts`` are this rank's rows (starting at global row ``offset``): the frequent
    tokens are gathered from every rank (``top x (L + 2)`` numbers per rank, once).
    """
    K = n_components
    _, weights, Xs = frequent_rows(X, counts, max(K, top), comm, offset)
    if weights.numel() < K:
        raise ValueError(f"k-means start needs at least K = {K} distinct tokens, got {weights.numel()}")
    feats = Xs - kernels.column_mean(X, comm=comm).to(Xs) if whitening is None else (Xs - whitening.mean) @ whitening.W
    rows = torch.arange(weights.numel(), device=X.device)
    Ws, S1s = [], []
    for _ in range(n_starts):
        labels, _ = weighted_kmeans(feats, weights, K, gen)
        G = torch.zeros(weights.numel(), K, dtype=torch.float64, device=X.device)
        G[rows, labels] = weights
        Ws.append(G.sum(0))
        S1s.append(G.T @ Xs)
    W, S1 = torch.cat(Ws), torch.cat(S1s)
    betas = []
    per_solve = max(K, KMEANS_BATCH_ATOMS // K * K)
    for lo in range(0, W.numel(), per_solve):
        w, s1 = W[lo : lo + per_solve], S1[lo : lo + per_solve]
        zero = torch.zeros(w.numel(), X.shape[1], dtype=torch.float64, device=X.device)
        state = AtomState.from_beta(X, zero, bias, dtype, chunk_size, comm)
        for _ in range(newton_steps):  # the ridge of one start's data (every start's clusters hold the same tokens)
            state, _ = newton_m_step(X, state, w, s1, ridge * float(W[:K].sum()), dtype=dtype, method="newton-cg",
                                     chunk_size=chunk_size, comm=comm)  # fmt: skip
        betas.append(state.beta)
    beta = torch.cat(betas)
    return [((w + 1e-12) / (w.sum() + K * 1e-12), beta[i * K : (i + 1) * K]) for i, w in enumerate(Ws)]


def kmeans_start(X: Tensor, counts: TokenCounts, n_components: int, gen: torch.Generator, **kw) -> tuple[Tensor, Tensor]:
    """One k-means start ``(alpha (K,), beta (K, L))``: :func:`kmeans_starts` with ``n_starts=1`` (same options)."""
    return kmeans_starts(X, counts, n_components, 1, gen, **kw)[0]


# ---------------------------------------------------------------------- the registry
@dataclass
class Start:
    """One start: a name (``"mom"``, ``"kmeans-2"``, ...), ``alpha (K,)`` and ``beta (K, L)`` in float64."""

    name: str
    alpha: Tensor
    beta: Tensor


@dataclass
class StartRequest:
    """What every start maker receives."""

    design: Design
    counts: TokenCounts
    n_components: int
    n_init: int
    generator: torch.Generator
    dtype: torch.dtype = torch.float64
    ridge: float = 1e-6
    mom_method: str = "tensor"
    options: dict[str, Any] = field(default_factory=dict)


StartMaker = Callable[[StartRequest], tuple[list[Start], dict]]
STARTS: dict[str, StartMaker] = {}


def register_start(name: str) -> Callable[[StartMaker], StartMaker]:
    """Register ``maker(request) -> (starts, info)`` under ``name`` (usable as ``EMFitter(init=name)``)."""

    def decorate(maker: StartMaker) -> StartMaker:
        STARTS[name] = maker
        return maker

    return decorate


def make_starts(kind: str, request: StartRequest) -> tuple[list[Start], dict]:
    """The starts ``kind`` makes for ``request``; ``kind`` must be a registered name."""
    if kind not in STARTS:
        raise ValueError(f"init must be one of {tuple(STARTS)}, a SoftmaxMixtureHead or a dict; got {kind!r}")
    return STARTS[kind](request)


def given_start(init: Any, n_components: int, hidden_size: int) -> Start:
    """A start given by the user: a head (anything with ``alpha`` and ``beta``) or ``{"alpha", "beta"}``."""
    if isinstance(init, dict):
        missing = {"alpha", "beta"} - set(init)
        if missing:
            raise ValueError(f"init dict lacks {sorted(missing)}; give 'alpha' (K,) and 'beta' (K, L)")
        alpha, beta = init["alpha"], init["beta"]
    else:
        alpha, beta = init.alpha, init.beta
    K, L = n_components, hidden_size
    alpha = torch.as_tensor(alpha).detach().to(torch.float64)
    beta = torch.as_tensor(beta).detach().to(torch.float64)
    if alpha.shape != (K,) or beta.shape != (K, L):
        raise ValueError(
            f"init must hold alpha of shape ({K},) and beta of shape ({K}, {L}); "
            f"got {tuple(alpha.shape)} and {tuple(beta.shape)}"
        )
    alpha = check_simplex("init alpha", alpha, K)
    check_finite("init beta", beta)
    return Start("given", alpha, beta)


@register_start("random")
def _random_starts(req: StartRequest) -> tuple[list[Start], dict]:
    total_var = float(req.design.column_variance.sum())
    starts = [random_start(req.design.X, req.n_components, req.generator, total_var) for _ in range(req.n_init)]
    return [Start(f"random-{i}", a, b) for i, (a, b) in enumerate(starts)], {}


@register_start("kmeans")
def _kmeans_starts(req: StartRequest) -> tuple[list[Start], dict]:
    d = req.design
    kw = dict(whitening=d.whitening, bias=d.bias, ridge=req.ridge, dtype=req.dtype, chunk_size=d.chunk_size,
              comm=d.comm, offset=d.lo)  # fmt: skip
    starts = kmeans_starts(d.X, req.counts, req.n_components, req.n_init, req.generator, **kw)
    return [Start(f"kmeans-{i}", a, b) for i, (a, b) in enumerate(starts)], {}


def _subspace(req: StartRequest, moments, n: int) -> list[Start]:
    subs = subspace_starts(moments, req.design.whitening, req.n_components, n, req.generator)
    return [Start(f"subspace-{i}", a, b) for i, (a, b) in enumerate(subs)]


@register_start("subspace")
def _subspace_starts(req: StartRequest) -> tuple[list[Start], dict]:
    d = req.design
    return _subspace(req, latent_moments(d.X, req.counts, d.whitening, d.chunk_size, d.comm), req.n_init), {}


def _mom(req: StartRequest):
    """The latent moments and the MoM estimate of ``req`` (both ``"mom"`` and ``"auto"`` start from it)."""
    d = req.design
    moments = latent_moments(d.X, req.counts, d.whitening, d.chunk_size, d.comm)
    mom = mom_estimate(d.X, req.counts, req.n_components, method=req.mom_method, whitening=d.whitening,
                       moments=moments, seed=req.generator)  # fmt: skip
    return moments, mom


@register_start("mom")
def _mom_starts(req: StartRequest) -> tuple[list[Start], dict]:
    moments, mom = _mom(req)
    info: dict[str, Any] = {"mom_method": req.mom_method, "mom": mom}
    if mom.ok:
        return [Start("mom", mom.alpha, mom.beta), *_subspace(req, moments, req.n_init - 1)], info
    info["fallback"] = f"MoM unusable ({mom.reason}); used subspace starts"
    warnings.warn(f"init='mom': {info['fallback']}", RuntimeWarning, stacklevel=4)
    return _subspace(req, moments, max(req.n_init, FALLBACK_STARTS)), info


@register_start("auto")
def _auto_starts(req: StartRequest) -> tuple[list[Start], dict]:
    """The MoM estimate (when usable) and k-means starts, ``n_init`` in all: which wins is left to the likelihood.

    MoM is exact in the limit on designs whose latent moments carry the mixture (Gaussian-like
    embeddings); on LM output layers the moments are far from that and the k-means starts of frequent
    tokens land nearer. Screening decides per data set.
    """
    _, mom = _mom(req)
    info: dict[str, Any] = {"mom_method": req.mom_method, "mom": mom}
    starts = [Start("mom", mom.alpha, mom.beta)] if mom.ok else []
    if not mom.ok:
        info["mom_unusable"] = mom.reason
    n_kmeans = max(req.n_init - len(starts), 1)
    kmeans, _ = _kmeans_starts(StartRequest(req.design, req.counts, req.n_components, n_kmeans, req.generator,
                                            req.dtype, req.ridge))  # fmt: skip
    return starts + kmeans, info
