"""L-BFGS polish of the marginal likelihood: gradient, optimum, and its use inside EMFitter."""

import pytest
import torch

from torch_softmix import EMFitter, TokenCounts
from torch_softmix import simulate as sim
from torch_softmix.moments import Whitening
from torch_softmix.polish import marginal_objective, out_of_reach, polish


def test_gradient_matches_autograd():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    bias = 0.3 * torch.randn(300, generator=gen, dtype=torch.float64)
    counts = TokenCounts.from_dense(torch.randint(0, 4, (300,), generator=gen).to(torch.int64))
    beta = torch.randn(3, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    u = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_(True)
    lam = 0.7

    law = torch.logsumexp(torch.log_softmax(u, 0) + torch.log_softmax(X @ beta.T + bias[:, None], 0), dim=1)
    F = (counts.dense().double() * law).sum() - 0.5 * lam * (beta**2).sum()
    F.backward()
    F2, ll, g_beta, g_u = marginal_objective(X, counts, beta.detach(), u.detach(), lam, bias)
    assert F2 == pytest.approx(float(F.detach()), rel=1e-12)
    assert ll == pytest.approx(float(F.detach()) + 0.5 * lam * float((beta.detach() ** 2).sum()), rel=1e-12)
    torch.testing.assert_close(g_beta, beta.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_u, u.grad, rtol=1e-10, atol=1e-10)


@pytest.fixture
def problem():
    X = sim.gaussian_design(3000, 6, seed=0, dtype=torch.float64)
    truth = sim.random_mixture(3, 6, norm=1.5, separation=1.0, min_weight=0.2, seed=1)
    counts = TokenCounts.from_dense(sim.sample_counts(sim.make_head(X, truth), 50_000, seed=2))
    return X, truth, counts


def test_polish_reaches_the_em_optimum_and_never_loses(problem):
    X, truth, counts = problem
    N, lam = counts.total, 1e-6 * counts.total
    em = EMFitter(3, init=truth, tol=1e-14, max_iter=3000)
    em.fit(X, counts=counts)
    start = sim.perturbed_start(truth, 0.3, seed=3)
    u0 = start["alpha"].log()
    F0 = marginal_objective(X, counts, start["beta"], u0, lam)[0] / N
    res = polish(X, counts, start["beta"], u0, lam, Whitening.from_design(X), max_iter=500, tol=1e-15)
    assert res.objective >= F0
    assert all(b >= a for a, b in zip(res.trace, res.trace[1:]))  # best-so-far never drops
    assert res.objective == pytest.approx(em.objective_, abs=1e-9)
    torch.testing.assert_close(res.beta, em.head_.beta.detach().double(), rtol=0, atol=1e-4)


def test_fitter_polish_is_kept_and_improves_a_short_em(problem):
    X, truth, counts = problem
    start = sim.perturbed_start(truth, 0.3, seed=4)
    # no moves or transfers: their EM iterations would bring the "short" fit within ~1e-6 of the optimum
    # (the gap then depends on the machine's rounding), and this test is about the polish alone
    plain = dict(init=start, max_iter=2, accelerate=None, n_moves=0, n_transfers=0)
    short = EMFitter(3, polish_iter=0, **plain)
    short.fit(X, counts=counts)
    polished = EMFitter(3, polish_iter=200, **plain)
    polished.fit(X, counts=counts)
    assert polished.polish_["kept"] and polished.polish_["n_evals"] > 1
    assert polished.objective_ > short.objective_ + 1e-3
    assert polished.history_[-1]["phase"] == "polish"
    assert polished.head_.fit_info["polish"]["objective_after"] == polished.objective_
    assert short.polish_ is None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_bad_polish_iter_is_refused(problem, bad):
    X, truth, counts = problem
    with pytest.raises(ValueError, match="polish_iter must be an int >= 0"):
        EMFitter(3, polish_iter=bad).fit(X, counts=counts)


def test_polish_with_a_collapsed_component_stays_finite(problem):
    X, truth, counts = problem
    start = sim.perturbed_start(truth, 0.3, seed=5)
    start["alpha"] = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    fitter = EMFitter(3, init=start, max_iter=2, polish_iter=50, n_moves=0, n_transfers=0)
    with pytest.warns(RuntimeWarning, match="collapsed"):
        head = fitter.fit(X, counts=counts)
    assert torch.isfinite(head.beta).all() and torch.isfinite(torch.tensor(fitter.objective_))
    em_only = EMFitter(3, init=start, max_iter=2, n_moves=0, n_transfers=0)
    with pytest.warns(RuntimeWarning, match="collapsed"):
        em_only.fit(X, counts=counts)
    assert fitter.objective_ >= em_only.objective_


def test_an_iteration_costs_two_passes_and_every_accepted_step_rises(problem):
    """Line-search trials move along the kept logits: passes = 2 per iteration + the start and the refreshes."""
    X, truth, counts = problem
    start = sim.perturbed_start(truth, 0.5, seed=5)
    res = polish(X, counts, start["beta"], start["alpha"].log(), 1e-6 * counts.total, Whitening.from_design(X),
                 max_iter=200, tol=1e-15, refresh=50)  # fmt: skip
    assert res.n_evals > res.n_iter  # line-search trials did happen ...
    refreshes = res.n_iter // 50 + 2  # start, every 50 iterations, end
    assert res.n_passes <= 2 * res.n_iter + refreshes + 1  # ... and cost no pass
    assert all(b >= a - 1e-13 for a, b in zip(res.trace, res.trace[1:]))


def test_float32_design_reaches_the_float64_optimum(problem):
    """The passes run in float32 but the kept logits, objective and line search are float64."""
    X, truth, counts = problem
    lam = 1e-6 * counts.total
    ref = polish(X, counts, truth["beta"], truth["alpha"].log(), lam, Whitening.from_design(X), max_iter=500,
                 tol=1e-15)  # fmt: skip
    X32 = X.float()
    res = polish(X32, counts, truth["beta"], truth["alpha"].log(), lam, Whitening.from_design(X32), max_iter=500,
                 tol=1e-15)  # fmt: skip
    exact = marginal_objective(X, counts, res.beta, res.log_alpha, lam)[0]
    assert exact / counts.total == pytest.approx(ref.objective, abs=2e-9)


def test_em_hands_over_to_the_quasi_newton_phase_when_it_slows(problem):
    X, truth, counts = problem
    start = sim.perturbed_start(truth, 1.0, seed=6)
    handed = EMFitter(3, init=start, tol=1e-12, max_iter=3000).fit(X, counts=counts)
    fitter = handed.fit_info
    assert fitter["polish"]["kept"]
    em_only = EMFitter(3, init=start, tol=1e-12, max_iter=3000, polish_iter=0)
    em_only.fit(X, counts=counts)
    # EM alone runs many more iterations to the same optimum
    assert handed.fit_info["n_iter"] < em_only.n_iter_
    assert fitter["polish"]["objective_after"] == pytest.approx(em_only.objective_, abs=1e-9)
    with pytest.raises(ValueError, match="switch_rate"):
        EMFitter(3, switch_rate=1.5).fit(X, counts=counts)


@pytest.fixture(scope="module")
def peaked():
    """Peaked component laws (a few tokens carry most of each), as on LM designs."""
    X = sim.gaussian_design(3000, 16, seed=0, dtype=torch.float64)
    truth = sim.random_mixture(3, 16, norm=6.0, separation=4.2, min_weight=0.2, seed=1)
    counts = TokenCounts.from_dense(sim.sample_counts(sim.make_head(X, truth, dtype=torch.float64), 100_000, seed=2))
    return X, truth, counts


def test_preconditioning_reaches_the_same_optimum_in_far_fewer_iterations(peaked):
    X, truth, counts = peaked
    start = sim.perturbed_start(truth, 0.3, seed=3)
    wh, lam = Whitening.from_design(X), 1e-6 * counts.total
    args = (X, counts, start["beta"], start["alpha"].log(), lam, wh)
    pre = polish(*args, max_iter=3000, tol=1e-14, precondition=True)
    plain = polish(*args, max_iter=3000, tol=1e-14, precondition=False)
    assert pre.converged and plain.converged
    assert pre.objective >= plain.objective - 1e-10
    assert pre.n_iter < plain.n_iter / 2


def test_covariance_from_the_top_tokens_matches_the_exact_one(peaked):
    from torch_softmix import kernels
    from torch_softmix.curvature import covariances

    X, truth, counts = peaked
    wh = Whitening.from_design(X)
    lg = kernels.logits(X, truth["beta"], None, dtype=torch.float64)
    exact = covariances(X, lg, wh, torch.float64, None, None, top=X.shape[0])
    s = torch.softmax(lg, 0)
    m = s.T @ X
    direct = torch.stack([(X - m[k]).T @ ((X - m[k]) * s[:, k : k + 1]) for k in range(3)])
    torch.testing.assert_close(exact, direct, rtol=1e-9, atol=1e-12)
    approx = covariances(X, lg, wh, torch.float64, None, None, top=300)  # 10% of the vocabulary
    err = (approx - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
    assert float(err.max()) < 0.05


def test_covariance_of_a_flat_law_takes_every_tied_token(peaked):
    """All logits equal (zero atoms): every token ties at the threshold and enters exactly, in slices."""
    from torch_softmix.curvature import covariances

    X, _, _ = peaked
    wh = Whitening.from_design(X)
    lg = torch.zeros(X.shape[0], 2, dtype=torch.float64)
    got = covariances(X, lg, wh, torch.float64, None, None, top=50)  # far below p: the top-token path
    Xc = X.double() - X.double().mean(0)
    flat = Xc.T @ Xc / X.shape[0]
    torch.testing.assert_close(got, flat.expand(2, -1, -1), rtol=1e-9, atol=1e-12)


def test_preconditioner_factors_singular_blocks_and_keeps_good_ones():
    from torch_softmix.curvature import cholesky_with_jitter

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    good = A @ A.T + 0.1 * torch.eye(4, dtype=torch.float64)
    v = torch.randn(4, 1, generator=gen, dtype=torch.float64)
    singular = v @ v.T  # rank one: a component on one token without ridge
    indefinite = singular - 1e-14 * torch.eye(4, dtype=torch.float64)  # rounding made it indefinite
    H = torch.stack([good, singular, indefinite, torch.zeros(4, 4, dtype=torch.float64)])
    chol = cholesky_with_jitter(H.clone())
    assert torch.isfinite(chol).all()
    torch.testing.assert_close(chol[0], torch.linalg.cholesky(good))
    for block in chol[1:]:
        assert (block.diagonal() > 0).all()  # a usable factor: the solve is defined


def test_history_is_monotone_through_polish_and_moves(peaked):
    X, truth, counts = peaked
    fitter = EMFitter(3, random_state=0, n_moves=2, max_iter=300)
    fitter.fit(X, counts=counts)
    obj = [h["objective"] for h in fitter.history_]
    assert all(b >= a - 1e-12 * max(1.0, abs(a)) for a, b in zip(obj, obj[1:]))
    assert obj[-1] == pytest.approx(fitter.objective_, abs=1e-12)


def test_out_of_reach_judges_by_the_recent_pace():
    steady = [1e-3 * i for i in range(41)]  # 1e-2 per window of 10: 0.96 more in the 960 iterations left
    assert not out_of_reach(steady, steady[-1] + 0.9, 960)
    assert out_of_reach(steady, steady[-1] + 1.0, 960)
    # fast, then a steady creep (the SmolLM2 trial that gained): the creep's pace counts, not a geometric tail
    creep = [5e-4 * min(i, 10) / 10 + 7e-6 * max(i - 10, 0) for i in range(31)]
    assert not out_of_reach(creep, creep[-1] + 1.2e-4, 970)
    stall = [1.0 - 0.5 ** (i / 10) for i in range(41)]  # the better window's pace for the iterations left
    g = stall[-11] - stall[-21]
    assert not out_of_reach(stall, stall[-1] + 0.9 * g * 100, 1000)
    assert out_of_reach(stall, stall[-1] + 1.1 * g * 100, 1000)
    assert not out_of_reach(steady[:20], 100.0, 10_000)  # never before two windows
    assert not out_of_reach(steady, steady[-1] - 1.0, 960)  # reached


def test_polish_gives_up_on_a_target_out_of_reach_and_not_on_one_it_reaches(problem):
    X, truth, counts = problem
    lam = 1e-6 * counts.total
    start = sim.perturbed_start(truth, 0.3, seed=3)
    u0, wh = start["alpha"].log(), Whitening.from_design(X)
    full = polish(X, counts, start["beta"], u0, lam, wh, max_iter=500, tol=1e-15)
    far = polish(X, counts, start["beta"], u0, lam, wh, max_iter=500, tol=1e-15, target=full.objective + 1e-2)
    assert far.gave_up and not full.gave_up and far.n_iter < full.n_iter
    assert far.objective >= far.trace[0]  # giving up keeps what was gained
    near = polish(X, counts, start["beta"], u0, lam, wh, max_iter=500, tol=1e-15, target=full.objective - 1e-6)
    assert not near.gave_up and near.objective >= full.objective - 1e-6
