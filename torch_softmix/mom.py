"""Method-of-moments (MoM) estimates of a softmax mixture from latent moments (docs/MATH.md §5).

Two estimators work inside the top-``K`` eigenspace ``U`` of ``M2`` (:mod:`torch_softmix.moments`):

* ``"univariate"`` (the route of Bing, Bunea, Niles-Weed & Wegkamp): for directions ``v = U theta``, the
  univariate mixing measure is read off the Hermite moments ``m_1..m_{2K-1}(v)`` (Hankel pencil, i.e.
  Gaussian quadrature nodes, then a weighted least-squares fit to ``K``-atomic measures: denoising), and
  the directions are combined into ``K`` atoms in ``R^K`` by matching their projections (1-D Wasserstein).
* ``"tensor"``: whiten ``U^T M2 U`` and diagonalise the projected third moment along random directions
  (Jennrich's algorithm; Anandkumar et al. 2014).

The moments cost ``O(|S| L K)`` after projecting the support's rows onto ``U``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import least_squares
from torch import Tensor

from .data import TokenCounts
from .kernels import allsum
from .moments import LatentMoments, Whitening, canonical_signs, hermite_moments, latent_moments, subspace
from .validation import make_generator


def _quadrature(m: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Nodes and weights of the ``K``-point measure with moments ``m_0..m_{2K-1}`` (Hankel pencil)."""
    H0 = np.array([[m[i + j] for j in range(K)] for i in range(K)])
    H1 = np.array([[m[i + j + 1] for j in range(K)] for i in range(K)])
    try:
        nodes = np.linalg.eigvals(np.linalg.solve(H0, H1))
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(nodes)):
        return None
    nodes = np.sort(nodes.real)
    V = np.vander(nodes, K, increasing=True).T  # (K moments, K nodes)
    weights, *_ = np.linalg.lstsq(V, m[:K], rcond=None)
    return nodes, weights


def univariate_mixture(
    t: Tensor, w: Tensor, K: int, n_tokens: float, comm=None
) -> tuple[np.ndarray, np.ndarray, float]:
    """A ``K``-atom mixing measure on the line from projected Hermite moments (denoised).

    Args:
        t: ``(S,)`` projections ``v . z_j`` of the support rows; ``w (S,)`` their frequencies.
    Returns:
        ``atoms (K,)`` sorted, ``weights (K,)`` on the simplex, and the weighted moment misfit
        (chi-square-like, in units of the moments' standard errors).
    """
    order = 2 * K - 1
    m_t, var_t = hermite_moments(t, w, order, comm)
    m, sd = m_t.cpu().numpy(), np.sqrt(var_t.cpu().numpy() / max(n_tokens, 1.0)) + 1e-12
    start = _quadrature(m, K)
    if start is None or np.any(start[1] <= 0) or np.ptp(start[0]) == 0:
        mu, s = m[1], math.sqrt(max(m[2] - m[1] ** 2, 1e-6))  # m_2 estimates E[gamma^2]
        start = (mu + s * np.linspace(-1, 1, K), np.full(K, 1.0 / K))
    nodes0, w0 = start
    w0 = np.clip(w0, 1e-6, None)
    r = np.arange(1, order + 1)

    def resid(theta: np.ndarray) -> np.ndarray:
        a, lw = theta[:K], theta[K:]
        wt = np.exp(lw - lw.max())
        wt /= wt.sum()
        return ((a[None, :] ** r[:, None]) @ wt - m[1:]) / sd[1:]

    theta0 = np.concatenate([nodes0, np.log(w0 / w0.sum())])
    sol = least_squares(resid, theta0, method="trf", max_nfev=200 * K)
    a, lw = sol.x[:K], sol.x[K:]
    wt = np.exp(lw - lw.max())
    wt /= wt.sum()
    idx = np.argsort(a)
    return a[idx], wt[idx], float(np.sum(sol.fun**2))


def wasserstein_1d(a: np.ndarray, wa: np.ndarray, b: np.ndarray, wb: np.ndarray) -> float:
    """``W1`` between two discrete measures on the line."""
    pts = np.concatenate([a, b])
    order = np.argsort(pts)
    pts = pts[order]
    mass = np.concatenate([wa, -wb])[order]
    cdf_gap = np.cumsum(mass)[:-1]
    return float(np.sum(np.abs(cdf_gap) * np.diff(pts)))


@dataclass
class MoMResult:
    """A MoM estimate: ``alpha (K,)``, ``beta (K, L)`` (``None`` when it failed) and diagnostics."""

    alpha: Tensor | None
    beta: Tensor | None
    method: str
    ok: bool
    reason: str = ""
    subspace: Tensor | None = None  # U (r, K)
    info: dict = field(default_factory=dict)


def _validate_subspace(moments: LatentMoments, K: int) -> str:
    r = moments.M2.shape[0]
    if K > r:
        return f"K = {K} exceeds the rank {r} of the whitened design"
    if K > moments.n_distinct:
        return f"K = {K} exceeds the {moments.n_distinct} distinct tokens seen"
    return ""


def _combine_directions(Y: Tensor, w: Tensor, K: int, N: float, Q: Tensor, comm=None) -> tuple[np.ndarray, np.ndarray]:
    """Combine univariate estimates along ``q_1`` (anchor) and ``(q_1 +- q_j)/sqrt 2`` into ``K`` atoms.

    ``Q (K, K)`` is an orthonormal basis; the ``j``-th coordinates of the atoms are the atoms along
    ``q_j``, matched to the anchor's by the permutation whose sums and differences best agree (1-D
    ``W1``) with the estimates along ``(q_1 +- q_j)/sqrt 2``, and whose weights agree.
    """
    Yq = Y @ Q
    a1, w1, _ = univariate_mixture(Yq[:, 0], w, K, N, comm)
    coords = np.zeros((K, K))
    coords[:, 0] = a1
    weights = [w1]
    perms = np.array(list(itertools.permutations(range(K)))) if K <= 6 else None
    spread = np.ptp(a1) + 1e-12
    for j in range(1, K):
        aj, wj, _ = univariate_mixture(Yq[:, j], w, K, N, comm)
        ap, wp, _ = univariate_mixture((Yq[:, 0] + Yq[:, j]) / math.sqrt(2), w, K, N, comm)
        am, wm, _ = univariate_mixture((Yq[:, 0] - Yq[:, j]) / math.sqrt(2), w, K, N, comm)

        def cost(sigma: np.ndarray, aj=aj, wj=wj, ap=ap, wp=wp, am=am, wm=wm) -> float:
            c, wc = aj[sigma], 0.5 * (w1 + wj[sigma])
            return (
                wasserstein_1d((a1 + c) / math.sqrt(2), wc, ap, wp)
                + wasserstein_1d((a1 - c) / math.sqrt(2), wc, am, wm)
                + spread * np.abs(w1 - wj[sigma]).sum()
            )

        if perms is not None:
            best = min(perms, key=cost)
        else:  # large K: pairwise swaps from the weight-sorted matching (local search)
            best = np.argsort(wj)[np.argsort(np.argsort(w1))]
            improved = True
            while improved:
                improved = False
                for i1, i2 in itertools.combinations(range(K), 2):
                    trial = best.copy()
                    trial[[i1, i2]] = trial[[i2, i1]]
                    if cost(trial) < cost(best) - 1e-15:
                        best, improved = trial, True
        coords[:, j] = aj[best]
        weights.append(wj[best])
    alpha = np.mean(weights, axis=0)
    return coords @ Q.cpu().numpy().T, alpha / alpha.sum()


def moment_misfit(
    Y: Tensor, w: Tensor, atoms: np.ndarray, alpha: np.ndarray, N: float, V: Tensor, comm=None
) -> float:
    """How far the candidate's projected moments ``sum_k alpha_k (v . b_k)^r`` are from the data's
    Hermite moments ``m_r(v)`` along the unit directions ``V (D, K)``, for ``r = 1..2K-1``, in
    standard errors (a chi-square)."""
    K = atoms.shape[0]
    order = 2 * K - 1
    proj = atoms @ V.cpu().numpy().T  # (K, D)
    r = np.arange(1, order + 1)
    total = 0.0
    for d in range(V.shape[0]):
        m, var = hermite_moments(Y @ V[d], w, order, comm)
        model = (proj[:, d][None, :] ** r[:, None]) @ alpha
        sd = np.sqrt(var.cpu().numpy()[1:] / max(N, 1.0)) + 1e-12
        total += float(np.sum(((model - m.cpu().numpy()[1:]) / sd) ** 2))
    return total


def _univariate_route(
    Y: Tensor, w: Tensor, K: int, N: float, gen: torch.Generator, n_bases: int = 4, comm=None
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's route: univariate mixing measures along directions, combined into atoms.

    Candidates from ``n_bases`` random orthonormal bases; the one whose projections best match the
    data's moments along ``2K`` fresh random directions is kept.
    """
    V = torch.randn(2 * K, K, generator=gen, dtype=torch.float64).to(Y)
    V = V / V.norm(dim=1, keepdim=True)
    best, best_fit = None, np.inf
    for _ in range(n_bases):
        Q, _ = torch.linalg.qr(torch.randn(K, K, generator=gen, dtype=torch.float64))
        atoms, alpha = _combine_directions(Y, w, K, N, Q.to(Y), comm)
        fit = moment_misfit(Y, w, atoms, alpha, N, V, comm)
        if fit < best_fit:
            best, best_fit = (atoms, alpha), fit
    return best


def _tensor_route(Y: Tensor, w: Tensor, K: int, gen: torch.Generator, comm=None) -> tuple[np.ndarray, np.ndarray]:
    """Jennrich's simultaneous diagonalisation of the whitened projected third moment."""
    eye = torch.eye(K, dtype=Y.dtype, device=Y.device)
    both = allsum(torch.cat([((Y * w[:, None]).T @ Y).flatten(), w @ Y]), comm, "mom_m2")
    M2, m1 = both[: K * K].view(K, K) - eye, both[K * K :]
    evals, evecs = torch.linalg.eigh(0.5 * (M2 + M2.T))
    evecs = canonical_signs(evecs)  # the random contractions below must see the same basis on every run
    if float(evals.min()) <= 1e-12 * max(float(evals.max()), 1e-300):
        raise np.linalg.LinAlgError("the projected second moment is not positive definite")
    Wm = evecs / evals.sqrt()  # Wm^T M2 Wm = I
    Yw = Y @ Wm  # (S, K)
    m1w = Wm.T @ m1  # whitened first moment
    G = Wm.T @ Wm  # whitened identity, for the sym(z (x) I) correction

    def T_contract(eta: Tensor) -> Tensor:
        """``M3(Wm, Wm, Wm . eta)``: a ``(K, K)`` symmetric matrix."""
        s = Yw @ eta
        first = allsum((Yw * (w * s)[:, None]).T @ Yw, comm, "mom_m3")
        ge = G @ eta
        corr = torch.outer(m1w, ge) + torch.outer(ge, m1w) + G * float(m1w @ eta)
        return first - corr

    best, best_gap = None, -1.0
    for _ in range(8):
        eta = torch.randn(K, generator=gen, dtype=torch.float64).to(Y)
        lam, V = torch.linalg.eigh(T_contract(eta / eta.norm()))
        gap = float(torch.diff(lam).min()) if K > 1 else 1.0
        if gap > best_gap:
            best, best_gap = V, gap
    V = best
    atoms, alphas = [], []
    Wm_inv_T = torch.linalg.inv(Wm).T  # maps whitened vectors back: b = Wm^{-T} u / sqrt(alpha)
    cubes = allsum(((Yw @ V) ** 3 * w[:, None]).sum(0), comm, "mom_t3")
    for k in range(K):
        u = V[:, k]
        t3 = float(cubes[k] - 3 * float(m1w @ u) * float(u @ G @ u))
        if abs(t3) < 1e-12:
            raise np.linalg.LinAlgError("a component of the third moment vanishes")
        alphas.append(1.0 / t3**2)
        atoms.append((Wm_inv_T @ u * t3).cpu().numpy())
    alpha = np.array(alphas)
    return np.stack(atoms), alpha / alpha.sum()


def mom_estimate(
    X: Tensor,
    counts: TokenCounts,
    n_components: int,
    *,
    method: str = "tensor",
    whitening: Whitening | None = None,
    moments: LatentMoments | None = None,
    seed: int | torch.Generator | None = 0,
) -> MoMResult:
    """The MoM estimate of ``(alpha, beta)`` from counts (docs/MATH.md §5); never raises on bad moments.

    Args:
        X: design ``(p, L)``; counts: :class:`TokenCounts` over its ``p`` rows.
        method: ``"tensor"`` (third moment, Jennrich) or ``"univariate"`` (the paper's Hermite route).
        seed: an int, a ``torch.Generator``, or ``None`` for a fresh seed (not reproducible).
    Returns:
        :class:`MoMResult` with ``ok=False`` and a ``reason`` when the moments are unusable
        (``K`` above the usable rank, too few tokens, non-positive or complex solutions).
    """
    if method not in ("tensor", "univariate"):
        raise ValueError(f"method must be 'tensor' or 'univariate', got {method!r}")
    K = n_components
    gen = make_generator(seed)  # None: a fresh seed, as everywhere in the library
    whitening = whitening if whitening is not None else Whitening.from_design(X)
    moments = moments if moments is not None else latent_moments(X, counts, whitening)
    reason = _validate_subspace(moments, K)
    if reason:
        return MoMResult(None, None, method, False, reason)
    U, evals = subspace(moments, K)
    if K == 1:
        gamma = moments.M1[None, :]
        return MoMResult(torch.ones(1, dtype=torch.float64), whitening.to_beta(gamma), method, True, subspace=U)
    Y = moments.project(U)  # (S, K)
    try:
        if method == "tensor":
            atoms, alpha = _tensor_route(Y, moments.pihat, K, gen, moments.comm)
        else:
            atoms, alpha = _univariate_route(Y, moments.pihat, K, moments.n_tokens, gen, comm=moments.comm)
    except (np.linalg.LinAlgError, torch.linalg.LinAlgError, ValueError) as err:
        return MoMResult(None, None, method, False, f"{type(err).__name__}: {err}", subspace=U)
    if not (np.all(np.isfinite(atoms)) and np.all(np.isfinite(alpha)) and np.all(alpha > 0)):
        return MoMResult(None, None, method, False, "non-finite atoms or non-positive weights", subspace=U)
    gamma = torch.as_tensor(atoms, dtype=torch.float64, device=U.device) @ U.T
    return MoMResult(
        torch.as_tensor(alpha, dtype=torch.float64),
        whitening.to_beta(gamma),
        method,
        True,
        subspace=U,
        info={"M2_eigenvalues": evals.tolist()},
    )


