"""EMFitter: monotone, recovers a known truth, same fit from tokens and counts, restarts."""

import numpy as np
import pytest
import torch

from torch_softmix import EMFitter, SoftmaxMixtureHead
from torch_softmix import simulate as sim


def _objectives(fitter):
    return np.array([h["objective"] for h in fitter.history_])


@pytest.mark.parametrize(
    "K, norm, ridge, seed",
    [
        (1, 1.0, 1e-6, 0),
        (2, 1.0, 0.0, 1),  # no ridge: the objective is the log-likelihood itself
        (3, 2.0, 1e-6, 2),
        (3, 8.0, 1e-6, 3),  # peaked components
        (5, 4.0, 1e-4, 4),
    ],
)
@pytest.mark.filterwarnings("ignore:init='mom'")
def test_em_never_decreases_objective(K, norm, ridge, seed):
    X = sim.gaussian_design(800, 5, seed=seed, dtype=torch.float64)
    truth = sim.random_mixture(K, 5, norm=norm, seed=seed + 100)
    counts = sim.sample_counts(sim.make_head(X, truth), 20_000, seed=seed)
    fitter = EMFitter(K, n_init=2, max_iter=60, tol=0, ridge=ridge, random_state=seed)
    fitter.fit(X, counts=counts)
    obj = _objectives(fitter)
    assert len(obj) > 5
    assert np.all(np.diff(obj) >= -1e-12 * np.abs(obj[:-1])), np.diff(obj).min()
    if ridge == 0:
        ll = np.array([h["loglik"] for h in fitter.history_])
        np.testing.assert_array_equal(ll, obj)


def test_em_monotone_in_float32():
    X = sim.gaussian_design(2000, 8, seed=7)
    truth = sim.random_mixture(3, 8, norm=3.0, seed=8)
    counts = sim.sample_counts(sim.make_head(X, truth), 100_000, seed=9)
    fitter = EMFitter(3, max_iter=40, tol=1e-9, random_state=0)
    head = fitter.fit(X, counts=counts)
    assert head.beta.dtype == torch.float32
    obj = _objectives(fitter)
    assert np.all(np.diff(obj) >= -1e-6), np.diff(obj).min()


@pytest.mark.slow
def test_recovery_near_start_matches_oracle():
    """p = 5000, L = 16, K = 3, N = 10^6: EM from a perturbed truth reaches the oracle-start error."""
    X = sim.gaussian_design(5000, 16, seed=0, dtype=torch.float64)
    truth = sim.random_mixture(3, 16, norm=2.0, separation=1.5, seed=1)
    true_head = sim.make_head(X, truth)
    counts = sim.sample_counts(true_head, 10**6, seed=2)
    oracle = EMFitter(3, init=truth, tol=1e-10, max_iter=500).fit(X, counts=counts)
    noise = torch.randn(3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    start = {"alpha": torch.tensor([0.2, 0.3, 0.5]), "beta": truth["beta"] + 0.25 * noise}
    start_err = sim.atom_errors(start["beta"], truth["beta"])["max"]
    fitter = EMFitter(3, init=start, tol=1e-10, max_iter=500)
    fit = fitter.fit(X, counts=counts)
    assert fitter.converged_
    err = sim.evaluate(fit, true_head)["atom_error_max"]
    err_oracle = sim.evaluate(oracle, true_head)["atom_error_max"]
    assert err <= 1.1 * err_oracle, (err, err_oracle)
    assert err < 0.1 * start_err, (err, start_err)
    assert abs(sim.evaluate(fit, true_head)["weight_error"]) < 0.02


def test_tokens_and_counts_give_identical_fits():
    X = sim.gaussian_design(300, 4, seed=10, dtype=torch.float64)
    truth = sim.random_mixture(2, 4, norm=2.0, seed=11)
    head = sim.make_head(X, truth)
    tokens = head.sample(5000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=300)
    a = EMFitter(2, random_state=3, max_iter=30).fit(X, tokens=tokens.reshape(50, 100))
    b = EMFitter(2, random_state=3, max_iter=30).fit(X, counts=counts)
    c = EMFitter(2, random_state=3, max_iter=30).fit(X, tokens=[tokens[:1234], tokens[1234:]])
    for other in (b, c):
        assert torch.equal(a.beta, other.beta) and torch.equal(a.log_alpha, other.log_alpha)


def test_same_seed_same_fit_and_restarts_keep_best():
    X = sim.gaussian_design(500, 4, seed=12, dtype=torch.float64)
    truth = sim.random_mixture(3, 4, norm=3.0, seed=13)
    counts = sim.sample_counts(sim.make_head(X, truth), 20_000, seed=1)
    kw = dict(init="random", n_init=4, init_max_iter=None, random_state=5, max_iter=50)
    f1 = EMFitter(3, **kw)
    h1 = f1.fit(X, counts=counts)
    h2 = EMFitter(3, **kw).fit(X, counts=counts)
    assert torch.equal(h1.beta, h2.beta)
    assert len(f1.init_results_) == 4
    assert f1.init_results_[f1.best_init_] == max(f1.init_results_)
    assert f1.objective_ >= max(f1.init_results_) - 1e-12  # the best start, continued (L-BFGS phase, moves)
    # screening: a few iterations per start, the best continued
    f3 = EMFitter(3, init="random", n_init=4, init_max_iter=3, random_state=5, max_iter=50)
    f3.fit(X, counts=counts)
    assert len(f3.init_results_) == 4 and f3.objective_ >= max(f3.init_results_) - 1e-12


def test_warm_start_from_head_and_fitted_attributes():
    X = sim.gaussian_design(300, 4, seed=14, dtype=torch.float64)
    truth = sim.random_mixture(2, 4, norm=2.0, seed=15)
    true_head = sim.make_head(X, truth)
    counts = sim.sample_counts(true_head, 50_000, seed=3)
    fitter = EMFitter(2, init=true_head, progress=True, tol=1e-9)
    head = fitter.fit(true_head, counts=counts)
    assert isinstance(head, SoftmaxMixtureHead) and head is fitter.head_
    assert head.embedding.data_ptr() == X.data_ptr()  # no copy of the design
    assert fitter.converged_ and fitter.n_iter_ >= 1
    assert fitter.lower_bound_ == pytest.approx(float(head.loglik(counts)) / 50_000, rel=1e-12)
    assert fitter.lower_bound_ >= float(true_head.loglik(counts)) / 50_000 - 1e-9
    assert head.fit_info["n_tokens"] == 50_000


def test_k_equals_one_matches_moment_condition():
    """K = 1 is a plain softmax regression: at the fit, m(beta) = mean embedding of the data (up to ridge)."""
    X = sim.gaussian_design(400, 3, seed=16, dtype=torch.float64)
    truth = sim.random_mixture(1, 3, norm=1.0, seed=17)
    counts = sim.sample_counts(sim.make_head(X, truth), 10_000, seed=4)
    head = EMFitter(1, tol=1e-12, ridge=0.0, random_state=0).fit(X, counts=counts)
    s = head.component_log_probs()[:, 0].exp()
    mu = (counts.double() @ X) / counts.sum()
    torch.testing.assert_close(s @ X, mu, rtol=0, atol=1e-8)
    assert head.alpha.item() == pytest.approx(1.0)
