"""The fit engine (problem, state, steps, run), the start registry, checkpoint keys and the estimator contract."""

import math
import warnings

import numpy as np
import pytest
import torch

from torch_softmix import ConvergenceWarning, Design, EMFitter, TokenCounts
from torch_softmix import simulate as sim
from torch_softmix.engine import FitProblem, em_map, run, squarem
from torch_softmix.mstep import AtomState
from torch_softmix.objective import information_criteria
from torch_softmix.starts import STARTS, Start, StartRequest, make_starts, register_start


def _problem(dtype=torch.float64, p=3000, L=6, K=3, N=50_000, seed=0, bias=False):
    X = sim.gaussian_design(p, L, seed=seed, dtype=dtype)
    b = 0.3 * torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=dtype) if bias else None
    truth = sim.random_mixture(K, L, norm=2.0, separation=1.0, seed=seed + 1)
    counts = sim.sample_counts(sim.make_head(X, truth, b), N, seed=seed + 2)
    return X, b, truth, counts


def test_run_is_monotone_and_ends_with_exact_logits():
    X, b, truth, counts = _problem(dtype=torch.float32, bias=True)
    problem = FitProblem(Design(X, b), TokenCounts.from_dense(counts), torch.float32, m_step="newton-cg", tol=0)
    start = sim.perturbed_start(truth, 0.5, seed=3)
    result = run(problem, problem.evaluate(problem.state(start["alpha"], start["beta"])), 40)
    obj = np.array([h["objective"] for h in result.history])
    assert result.n_iter >= 10 and result.stop in ("max_iter", "tol")
    assert np.all(np.diff(obj) >= -1e-6)
    fresh = AtomState.from_beta(X, result.state.beta, b, torch.float32)
    assert torch.equal(result.state.atoms.logits, fresh.logits)  # refreshed, not accumulated
    assert result.point.objective == obj[-1]


def test_squarem_is_never_worse_than_the_plain_em_iterate():
    X, b, truth, counts = _problem()
    problem = FitProblem(Design(X, b), TokenCounts.from_dense(counts), torch.float64, m_step="newton")
    p0 = problem.evaluate(problem.state(torch.ones(3) / 3, sim.perturbed_start(truth, 1.0, seed=4)["beta"]))
    for _ in range(5):
        p1, _ = em_map(problem, p0)
        p2, _ = em_map(problem, p1)
        p3, a = squarem(problem, p0, p1, p2)
        assert p3.objective >= p2.objective and (a <= -1.0)
        p0 = p3


def test_start_registry_has_one_signature_and_accepts_new_makers():
    X, b, truth, counts = _problem()
    design, data = Design(X), TokenCounts.from_dense(counts)
    for name in ("mom", "subspace", "kmeans", "random"):
        req = StartRequest(design, data, 3, 2, torch.Generator().manual_seed(0))
        starts, info = make_starts(name, req)
        assert len(starts) >= 2 and isinstance(info, dict)
        assert all(s.alpha.shape == (3,) and s.beta.shape == (3, 6) for s in starts)

    @register_start("truth-for-test")
    def _truth(req):
        return [Start("truth", truth["alpha"], truth["beta"])], {"note": "given by a test"}

    try:
        fitter = EMFitter(3, init="truth-for-test", random_state=0)
        fitter.fit(X, counts=counts)
        assert fitter.init_names_ == ["truth"] and fitter.init_info_ == {"note": "given by a test"}
    finally:
        STARTS.pop("truth-for-test")


def test_design_caches_its_whitening_and_fingerprint():
    X, *_ = _problem()
    d = Design(X)
    assert d.whitening is d.whitening and d.fingerprint == Design(X.clone()).fingerprint
    assert Design(X, torch.zeros(X.shape[0], dtype=X.dtype)).fingerprint != d.fingerprint


# ---------------------------------------------------------------------- the estimator contract
def test_score_bic_aic_and_lower_bounds():
    X, b, truth, counts = _problem()
    fitter = EMFitter(3, init=truth, tol=1e-10)
    head = fitter.fit(X, counts=counts)
    N = float(counts.sum())
    assert fitter.score(counts) == pytest.approx(fitter.lower_bound_, rel=1e-12)
    tokens = torch.repeat_interleave(torch.arange(len(counts)), counts)
    assert fitter.score(tokens=tokens) == pytest.approx(fitter.score(counts), rel=1e-12)
    ic = information_criteria(fitter.lower_bound_ * N, 3, 6, N)
    assert fitter.bic(counts) == pytest.approx(ic["bic"]) and fitter.aic(counts) == pytest.approx(ic["aic"])
    one = EMFitter(1, random_state=0).fit(X, counts=counts)
    assert one.n_components == 1 and fitter.bic(counts) < EMFitter(1).fit(X, counts=counts).loglik(counts) * -2
    assert fitter.lower_bounds_ == [h["loglik"] for h in fitter.history_]
    assert fitter.lower_bounds_[-1] == fitter.lower_bound_
    assert fitter.converged_ and fitter.stop_reason_ in ("tol", "polish_tol")
    assert head.fit_info["stop"] == fitter.stop_reason_
    assert fitter.m_step_ == "newton"  # L = 6 <= 32 with m_step="auto"
    with pytest.raises(RuntimeError, match="not fitted"):
        EMFitter(2).score(counts)


def test_convergence_warning_only_when_the_budget_ends_the_fit():
    X, b, truth, counts = _problem()
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        short = EMFitter(3, init=truth, max_iter=2, polish_iter=0)
        short.fit(X, counts=counts)
    assert short.stop_reason_ == "max_iter" and not short.converged_
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        EMFitter(3, init=truth, tol=1e-8).fit(X, counts=counts)


def test_parameter_constraints_are_declared_for_every_setting():
    import inspect

    params = set(inspect.signature(EMFitter.__init__).parameters) - {"self", "checkpoint", "progress"}
    assert params == set(EMFitter._parameter_constraints)


def test_progress_bars_cover_screening_em_and_lbfgs(capsys):
    X, b, truth, counts = _problem()
    EMFitter(3, init="random", n_init=2, init_max_iter=3, max_iter=5, polish_iter=5, progress=True,
             random_state=0).fit(X, counts=counts)  # fmt: skip
    err = capsys.readouterr().err
    assert "screening 2 starts" in err and "EM K=3" in err and "L-BFGS K=3" in err


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_key_covers_bias_start_and_search_settings(tmp_path):
    X, b, truth, counts = _problem(bias=True)
    ckpt = tmp_path / "fit.ckpt"
    base = dict(init="random", n_init=2, init_max_iter=2, max_iter=3, random_state=0, checkpoint=ckpt,
                checkpoint_every=1)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        EMFitter(3, **base).fit(X, counts=counts, bias=b)
    others = [
        ({}, {"bias": b + 0.01}),
        ({"init": "kmeans"}, {"bias": b}),
        ({"random_state": 1}, {"bias": b}),
        ({"n_init": 3}, {"bias": b}),
        ({"init_max_iter": 3}, {"bias": b}),
        ({"accelerate": None}, {"bias": b}),
    ]
    for settings, fit_kw in others:
        with pytest.raises(ValueError, match="belongs to another fit"):
            EMFitter(3, **{**base, **settings}).fit(X, counts=counts, **fit_kw)


def test_max_iter_counts_iterations_after_screening():
    X, b, truth, counts = _problem()
    fitter = EMFitter(3, init="random", n_init=3, init_max_iter=4, max_iter=6, tol=0, accelerate=None,
                      random_state=0, polish_iter=0, n_moves=0, n_transfers=0)  # fmt: skip
    with pytest.warns(ConvergenceWarning):
        fitter.fit(X, counts=counts)
    assert fitter.n_iter_ == 4 + 6 and fitter.history_[-1]["iter"] == 10


def test_lower_bound_is_the_loglik_of_the_returned_head_in_float32():
    """Cached logits drift from X beta^T by rounding; the reported likelihood is recomputed from the atoms."""
    X, b, truth, counts = _problem(dtype=torch.float32, p=20_000, L=32, K=4, N=10**6, seed=5)
    fitter = EMFitter(4, init="random", random_state=0, max_iter=150, tol=0, accelerate="squarem", polish_iter=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        head = fitter.fit(X, counts=counts)
    assert fitter.n_iter_ >= 30
    N = float(counts.sum())
    assert head.beta.dtype == torch.float32
    assert math.isclose(fitter.lower_bound_, float(head.loglik(counts)) / N, rel_tol=1e-13, abs_tol=0)


def test_fused_e_step_forms_the_statistics_and_the_softmax_means_in_one_pass():
    from torch_softmix import kernels

    X, b, truth, counts = _problem(p=4000, N=15_000, bias=True)  # about 60% of the rows have counts
    c = TokenCounts.from_dense(counts)
    beta = truth["beta"] + 0.3
    lg = kernels.logits(X, beta, b)
    A = kernels.log_normalizer_from_logits(lg)
    log_alpha = torch.log(truth["alpha"])
    before = kernels.PASSES[0]
    apart = kernels.e_step_from_logits(X, lg.index_select(0, c.support), log_alpha, A, c.support, c.values, X.dtype)
    mean = kernels.weighted_sum(X, kernels.probs_from_logits(lg, A, X.dtype))
    passes_apart, before = kernels.PASSES[0] - before, kernels.PASSES[0]
    fused = kernels.e_step_with_mean(X, lg, log_alpha, A, c.support, c.values, X.dtype)
    assert kernels.PASSES[0] - before == 1.0 and passes_apart == pytest.approx(1 + c.n_distinct / 4000)
    assert 0.5 < c.n_distinct / 4000 < 0.9 and apart.mean is None
    torch.testing.assert_close(fused.loglik, apart.loglik, rtol=1e-14, atol=0)
    torch.testing.assert_close(fused.W, apart.W, rtol=1e-14, atol=0)
    torch.testing.assert_close(fused.S1, apart.S1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.mean, mean, rtol=1e-12, atol=1e-12)
    small = kernels.e_step_with_mean(X, lg, log_alpha, A, c.support, c.values, X.dtype, chunk_size=97)  # 42 chunks
    torch.testing.assert_close(small.S1, apart.S1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(small.mean, mean, rtol=1e-12, atol=1e-12)


def test_em_with_and_without_the_fused_pass_takes_the_same_path(monkeypatch):
    from torch_softmix import kernels

    X, b, truth, counts = _problem(dtype=torch.float32, L=40, bias=True)
    start = sim.perturbed_start(truth, 0.5, seed=3)
    fits = {}
    for fuse in (True, False):
        monkeypatch.setattr(kernels, "FUSE_MIN_SUPPORT", 0.5 if fuse else math.inf)
        monkeypatch.setattr(kernels, "FUSE_MIN_WIDTH", 0)
        problem = FitProblem(Design(X, b), TokenCounts.from_dense(counts), torch.float32, m_step="newton-cg", tol=0)
        assert problem.fuse_mean == fuse
        kernels.PASSES[0] = 0.0
        fits[fuse] = run(problem, problem.evaluate(problem.state(start["alpha"], start["beta"])), 12)
        fits[fuse].passes = kernels.PASSES[0]
    on, off = fits[True], fits[False]
    assert on.n_iter == off.n_iter == 12
    for h_on, h_off in zip(on.history, off.history):  # the same iterates, to float32 rounding
        assert h_on["objective"] == pytest.approx(h_off["objective"], abs=1e-6)
    torch.testing.assert_close(on.state.beta, off.state.beta, rtol=1e-3, atol=1e-3)
    assert on.passes < off.passes - 0.5 * on.n_iter  # the support's pass saved at every M-step
