"""Latent moments and the MoM / subspace starts (MATH.md §4)."""

import numpy as np
import pytest
import torch

from torch_softmix import EMFitter, TokenCounts
from torch_softmix import simulate as sim
from torch_softmix.mom import mom_estimate
from torch_softmix.moments import Whitening, hermite_moments, latent_moments


def _truth_latent(truth, whitening):
    gamma = whitening.to_gamma(truth["beta"])
    a = truth["alpha"]
    return gamma, a @ gamma, (gamma.T * a) @ gamma


def test_whitening_round_trip_and_rank_deficiency():
    X = sim.gaussian_design(2000, 5, seed=0, dtype=torch.float64)
    Xd = torch.cat([X, X[:, :1] + X[:, 1:2]], dim=1)  # a dependent column: rank 5 of 6
    w = Whitening.from_design(Xd)
    assert w.rank == 5
    Z = (Xd - w.mean) @ w.W
    torch.testing.assert_close(Z.T @ Z / 2000, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-8)
    beta = torch.randn(2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    back = w.to_beta(w.to_gamma(beta))  # same logits up to a constant: X (beta - back) is constant
    diff = Xd @ (beta - back).T
    assert float((diff - diff.mean(0)).abs().max()) < 1e-8


def test_hermite_moments_of_a_point_mass_shifted_gaussian():
    g = torch.Generator().manual_seed(0)
    t = 0.7 + torch.randn(2_000_000, generator=g, dtype=torch.float64)
    w = torch.full_like(t, 1 / t.numel())
    m, var = hermite_moments(t, w, 5)
    z = (m.numpy() - 0.7 ** np.arange(6)) / np.sqrt(var.numpy() / t.numel() + 1e-300)  # E He_r(Z + t) = t^r
    assert np.all(np.abs(z[1:]) < 5), z


def test_latent_moments_converge_as_n_grows():
    """Sampling error -> 0 like N^{-1/2} toward the moments of the exact law, which lie close to the
    latent moments of the mixing measure (the gap is the design's finite-p bias)."""
    p, L = 200_000, 3
    X = sim.gaussian_design(p, L, seed=1, dtype=torch.float64)
    truth = sim.random_mixture(2, L, norm=1.0, separation=1.0, seed=2)
    head = sim.make_head(X, truth)
    w = Whitening.from_design(X)
    gamma, M1_true, M2_true = _truth_latent(truth, w)
    v = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)
    m3_true = float(truth["alpha"] @ (gamma @ v) ** 3)

    def summary(lm):
        return np.array(
            [
                *lm.M1.tolist(),
                *lm.M2.flatten().tolist(),
                float(hermite_moments(lm.project(v[:, None])[:, 0], lm.pihat, 3)[0][3]),
            ]
        )

    exact = summary(latent_moments(X, TokenCounts.from_dense(head.log_probs().detach().exp()), w))
    errors = []
    for N in (10**3, 10**4, 10**5, 10**6):
        errs = [
            np.abs(
                summary(latent_moments(X, TokenCounts.from_dense(sim.sample_counts(head, N, seed=s)), w)) - exact
            ).max()
            for s in range(4)
        ]
        errors.append(np.mean(errs))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1 * errors[0], errors  # ~ sqrt(1000) = 31.6 times smaller in theory
    latent = np.array([*M1_true.tolist(), *M2_true.flatten().tolist(), m3_true])
    assert np.abs(exact - latent).max() < 0.05, np.abs(exact - latent)


@pytest.mark.parametrize("K, method, tol", [(2, "tensor", 0.25), (3, "tensor", 0.4), (2, "univariate", 0.25)])
def test_mom_recovers_separated_atoms(K, method, tol):
    X = sim.gaussian_design(50_000, 8, seed=0, dtype=torch.float64)
    truth = sim.random_mixture(K, 8, norm=2.0, separation=2.0, min_weight=0.2, seed=10)
    counts = TokenCounts.from_dense(sim.sample_counts(sim.make_head(X, truth), 10**6, seed=2))
    est = mom_estimate(X, counts, K, method=method)
    assert est.ok, est.reason
    assert sim.atom_errors(est.beta, truth["beta"])["max"] < tol
    assert float(est.alpha.sum()) == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("K", [2, 3])
def test_em_from_mom_reaches_the_oracle(K):
    X = sim.gaussian_design(20_000, 16, seed=3, dtype=torch.float64)
    truth = sim.random_mixture(K, 16, norm=2.0, separation=1.5, min_weight=0.2, seed=4)
    true_head = sim.make_head(X, truth)
    counts = sim.sample_counts(true_head, 10**6, seed=5)
    oracle = EMFitter(K, init=truth, tol=1e-10).fit(X, counts=counts)
    fitter = EMFitter(K, init="mom", n_init=1, tol=1e-10)
    fit = fitter.fit(X, counts=counts)
    assert fitter.init_names_ == ["mom"] and fitter.mom_.ok
    err = sim.evaluate(fit, true_head)["atom_error_max"]
    assert err <= 1.1 * sim.evaluate(oracle, true_head)["atom_error_max"]


def test_subspace_restarts_record_every_start():
    X = sim.gaussian_design(5000, 6, seed=6, dtype=torch.float64)
    truth = sim.random_mixture(3, 6, norm=2.0, separation=1.5, seed=7)
    counts = sim.sample_counts(sim.make_head(X, truth), 100_000, seed=8)
    fitter = EMFitter(3, init="subspace", n_init=5, init_max_iter=3, random_state=0)
    fitter.fit(X, counts=counts)
    assert fitter.init_names_ == [f"subspace-{i}" for i in range(5)]
    assert len(fitter.init_results_) == len(fitter.init_logliks_) == 5
    assert fitter.head_.fit_info["best_init"] == fitter.init_names_[fitter.best_init_]
    mixed = EMFitter(3, init="mom", n_init=4, random_state=0)
    mixed.fit(X, counts=counts)
    assert mixed.init_names_ == ["mom", "subspace-0", "subspace-1", "subspace-2"]


@pytest.mark.parametrize(
    "L, K, n_tokens, why",
    [
        (3, 5, 100_000, "exceeds the rank"),  # K larger than L
        (6, 3, 2, "distinct tokens"),  # too few tokens
    ],
)
def test_invalid_moments_fall_back_to_subspace_starts(L, K, n_tokens, why):
    X = sim.gaussian_design(3000, L, seed=9, dtype=torch.float64)
    truth = sim.random_mixture(K, L, norm=1.0, seed=10)
    head = sim.make_head(X, truth)
    counts = torch.bincount(head.sample(n_tokens, generator=torch.Generator().manual_seed(0)), minlength=3000)
    if n_tokens == 2:
        counts = torch.zeros(3000, dtype=torch.long)
        counts[[5, 9]] = 1
    est = mom_estimate(X, TokenCounts.from_dense(counts), K)
    assert not est.ok and why in est.reason
    fitter = EMFitter(K, init="mom", random_state=0, max_iter=20)
    if n_tokens == 2:  # the fitter refuses K above the distinct tokens seen before any start
        with pytest.raises(ValueError, match="distinct tokens seen"):
            fitter.fit(X, counts=counts)
        return
    with pytest.warns(RuntimeWarning, match="MoM unusable"):
        head_fit = fitter.fit(X, counts=counts)
    assert "fallback" in fitter.init_info_ and why in fitter.init_info_["fallback"]
    assert all(name.startswith("subspace") for name in fitter.init_names_) and len(fitter.init_names_) == 10
    assert torch.isfinite(head_fit.beta).all()
    assert "init_fallback" in head_fit.fit_info


def test_seed_none_means_a_fresh_seed_as_everywhere_else():
    X = sim.gaussian_design(3000, 6, seed=0, dtype=torch.float64)
    truth = sim.random_mixture(3, 6, norm=2.0, separation=1.5, seed=1)
    counts = TokenCounts.from_dense(sim.sample_counts(sim.make_head(X, truth), 50_000, seed=2))
    fixed = [mom_estimate(X, counts, 3, method="univariate", seed=0).beta for _ in range(2)]
    assert torch.equal(fixed[0], fixed[1])
    fresh = [mom_estimate(X, counts, 3, method="univariate", seed=None).beta for _ in range(2)]
    assert not torch.equal(fresh[0], fresh[1])
