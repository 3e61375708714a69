"""Synthetic designs and truths, sampling, and the evaluation metrics of docs/MATH.md §7."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .head import SoftmaxMixtureHead
from .objective import information_criteria, n_parameters
from .validation import make_generator

__all__ = [
    "atom_errors",
    "evaluate",
    "gaussian_design",
    "information_criteria",  # re-exported: the formula lives in torch_softmix.objective
    "kl_divergence",
    "make_head",
    "match_components",
    "n_parameters",
    "perturbed_start",
    "random_mixture",
    "sample_counts",
    "tv_distance",
    "weight_error",
]


def _generator(seed: int | None) -> torch.Generator:
    return make_generator(seed)


def gaussian_design(
    p: int, L: int, *, cov: Tensor | None = None, seed: int | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A design ``X (p, L)`` with i.i.d. rows ``N(0, I_L)``, or ``N(0, cov)`` for a given ``cov (L, L)``."""
    Z = torch.randn(p, L, generator=_generator(seed), dtype=torch.float64)
    if cov is not None:
        cov = torch.as_tensor(cov, dtype=torch.float64)
        if cov.shape != (L, L):
            raise ValueError(f"cov must have shape ({L}, {L}), got {tuple(cov.shape)}")
        Z = Z @ torch.linalg.cholesky(cov).T
    return Z.to(dtype)


def random_mixture(
    n_components: int,
    dim: int,
    *,
    norm: float = 1.0,
    separation: float | None = None,
    alpha: Tensor | None = None,
    min_weight: float | None = None,
    seed: int | None = None,
    max_tries: int = 10_000,
) -> dict[str, Tensor]:
    """A truth ``{"alpha": (K,), "beta": (K, dim)}`` in float64.

    Atoms have Euclidean norm ``norm`` and, if ``separation`` is given, pairwise distances at least
    ``separation`` (drawn by rejection). Weights are ``alpha`` if given, else uniform, or, with
    ``min_weight``, Dirichlet(1) draws whose smallest weight is at least ``min_weight``.
    """
    gen = _generator(seed)
    K = n_components
    for _ in range(max_tries):
        beta = torch.randn(K, dim, generator=gen, dtype=torch.float64)
        beta = norm * beta / beta.norm(dim=1, keepdim=True)
        if separation is None or K == 1 or float(torch.pdist(beta).min()) >= separation:
            break
    else:
        raise ValueError(f"could not draw {K} atoms of norm {norm} in R^{dim} with separation {separation}")
    if alpha is None:
        if min_weight is None:
            alpha = torch.full((K,), 1.0 / K, dtype=torch.float64)
        else:
            if min_weight * K >= 1:
                raise ValueError(f"min_weight must be < 1/K = {1 / K}, got {min_weight}")
            for _ in range(max_tries):
                alpha = -torch.log(torch.rand(K, generator=gen, dtype=torch.float64))
                alpha = alpha / alpha.sum()
                if float(alpha.min()) >= min_weight:
                    break
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    return {"alpha": alpha / alpha.sum(), "beta": beta}


def perturbed_start(truth: dict[str, Tensor], noise: float, *, seed: int | None = None) -> dict[str, Tensor]:
    """A start near ``truth``: each atom moved by ``noise × ||beta_k||`` in a random direction, weights uniform.

    Returns ``{"alpha": (K,), "beta": (K, L)}`` in float64, ready for ``EMFitter(init=...)``.
    """
    beta = truth["beta"].double()
    K = beta.shape[0]
    step = torch.randn(beta.shape, generator=_generator(seed), dtype=torch.float64)
    step = step / step.norm(dim=1, keepdim=True) * beta.norm(dim=1, keepdim=True)
    return {"alpha": torch.full((K,), 1.0 / K, dtype=torch.float64), "beta": beta + noise * step}


def make_head(embedding: Tensor, truth: dict[str, Tensor], bias: Tensor | None = None, **kwargs) -> SoftmaxMixtureHead:
    """A head over ``embedding`` holding the truth's ``alpha`` and ``beta``."""
    K = truth["beta"].shape[0]
    return SoftmaxMixtureHead(embedding, K, bias, alpha=truth["alpha"], beta=truth["beta"], **kwargs)


def sample_counts(head: SoftmaxMixtureHead, n: int, seed: int | None = None) -> Tensor:
    """Counts ``(p,)`` int64 of ``n`` tokens drawn from the head's law (one multinomial draw, O(p))."""
    probs = head.log_probs().detach().double().exp().cpu().numpy()
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.multinomial(int(n), probs / probs.sum())).to(torch.int64)


# ---------------------------------------------------------------------- metrics
def match_components(beta_hat: Tensor, beta: Tensor) -> Tensor:
    """The permutation ``perm (K,)`` with ``beta_hat[perm[k]]`` matched to ``beta[k]`` (Hungarian, L2 cost)."""
    cost = torch.cdist(beta.detach().double().cpu(), beta_hat.detach().double().cpu()).numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def atom_errors(beta_hat: Tensor, beta: Tensor, perm: Tensor | None = None) -> dict[str, float | list[float]]:
    """Relative atom errors ``||beta_hat_k - beta_k|| / ||beta_k||`` after matching: max, mean, each."""
    beta, beta_hat = beta.detach().double().cpu(), beta_hat.detach().double().cpu()
    perm = match_components(beta_hat, beta) if perm is None else perm
    rel = (beta_hat[perm] - beta).norm(dim=1) / beta.norm(dim=1).clamp_min(1e-300)
    return {"max": float(rel.max()), "mean": float(rel.mean()), "each": rel.tolist()}


def weight_error(alpha_hat: Tensor, alpha: Tensor, perm: Tensor) -> float:
    """``|alpha_hat - alpha|_1`` after matching."""
    return float((alpha_hat.detach().double().cpu()[perm] - alpha.double().cpu()).abs().sum())


def tv_distance(log_p: Tensor, log_q: Tensor) -> float:
    """Total variation ``(1/2) sum |p - q|`` between two log laws ``(p,)``."""
    return 0.5 * float((log_p.detach().double().exp() - log_q.detach().double().exp()).abs().sum())


def kl_divergence(log_p: Tensor, log_q: Tensor) -> float:
    """``KL(p || q) = sum p (log p - log q)`` between two log laws ``(p,)``."""
    lp, lq = log_p.detach().double(), log_q.detach().double()
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return float(terms.sum())


@torch.no_grad()
def evaluate(fitted: SoftmaxMixtureHead, truth: SoftmaxMixtureHead) -> dict[str, object]:
    """Compare a fitted head with the true one (same design), after Hungarian matching.

    Returns atom errors (relative L2), ``weight_error`` (L1), mixture ``tv`` and ``kl`` (true || fit),
    per-component ``component_kl`` (true || matched fit), atom ``cosine`` and the permutation.
    """
    perm = match_components(fitted.beta, truth.beta)
    atoms = atom_errors(fitted.beta, truth.beta, perm)
    lp_true, lp_fit = truth.log_probs(), fitted.log_probs()
    comp_true, comp_fit = truth.component_log_probs(), fitted.component_log_probs()
    bt, bf = truth.beta.double().cpu(), fitted.beta.double().cpu()[perm]
    cos = torch.nn.functional.cosine_similarity(bt, bf, dim=1)
    return {
        "atom_error_max": atoms["max"],
        "atom_error_mean": atoms["mean"],
        "atom_error": atoms["each"],
        "weight_error": weight_error(fitted.alpha, truth.alpha, perm),
        "tv": tv_distance(lp_true, lp_fit),
        "kl": kl_divergence(lp_true, lp_fit),
        "component_kl": [kl_divergence(comp_true[:, k], comp_fit[:, int(perm[k])]) for k in range(len(perm))],
        "cosine": cos.tolist(),
        "perm": perm.tolist(),
    }


