"""The M-step's objective, gradient and Hessian against autograd; Newton raises the objective."""

import pytest
import torch

from torch_softmix import kernels, mstep
from torch_softmix import simulate as sim


def _autograd_objective(X, bias, beta, W, S1, lam):
    logits = X @ beta.T + bias[:, None]
    A = torch.logsumexp(logits, dim=0)
    return (S1 * beta).sum(1) - W * A - 0.5 * lam * (beta * beta).sum(1)


def test_gradient_and_hessian_match_autograd():
    X = sim.gaussian_design(300, 5, seed=3, dtype=torch.float64)
    bias = torch.randn(300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    beta = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    W = torch.tensor([10.0, 3.0, 0.5], dtype=torch.float64)
    S1 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    lam = 0.7
    mom = kernels.softmax_moments(X, beta, bias, order=2, chunk_size=37)  # several chunks
    f = mstep.m_objective(beta, mom.A, W, S1, lam)
    g = mstep.m_gradient(beta, mom.m, W, S1, lam)
    H = mstep.m_hessian(mom.C, W, lam)
    ref_f = _autograd_objective(X, bias, beta, W, S1, lam)
    torch.testing.assert_close(f, ref_f, rtol=1e-12, atol=1e-12)
    for k in range(3):

        def fk(b, k=k):
            bb = beta.clone()
            bb[k] = b
            return _autograd_objective(X, bias, bb, W, S1, lam)[k]

        gk = torch.autograd.functional.jacobian(fk, beta[k])
        Hk = torch.autograd.functional.hessian(fk, beta[k])
        torch.testing.assert_close(g[k], gk, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(H[k], Hk, rtol=1e-10, atol=1e-10)


def test_moments_are_chunk_invariant_and_match_direct():
    X = sim.gaussian_design(500, 4, seed=4, dtype=torch.float64)
    beta = 3.0 * torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direct_logits = X @ beta.T
    s = torch.softmax(direct_logits, dim=0)  # (p, K)
    m = s.T @ X
    for chunk in (1, 7, 500, None):
        mom = kernels.softmax_moments(X, beta, order=2, chunk_size=chunk)
        torch.testing.assert_close(mom.A, torch.logsumexp(direct_logits, 0))
        torch.testing.assert_close(mom.m, m)
        for k in range(2):
            C = X.T @ (s[:, k : k + 1] * X) - torch.outer(m[k], m[k])
            torch.testing.assert_close(mom.C[k], C)


@pytest.mark.parametrize("method", ["newton", "newton-cg"])
def test_newton_m_step_increases_each_objective_and_converges(method):
    X = sim.gaussian_design(300, 4, seed=5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    W = torch.tensor([50.0, 20.0], dtype=torch.float64)
    S1 = W[:, None] * kernels.softmax_moments(X, target, order=1).m  # mu_k = m(target): optimum near target
    lam = 1e-3
    state = mstep.AtomState.from_beta(X, torch.zeros(2, 4, dtype=torch.float64), None, torch.float64)
    f_prev = mstep.m_objective(state.beta, state.A, W, S1, lam)
    for _ in range(15):
        state, info = mstep.newton_m_step(X, state, W, S1, lam, dtype=torch.float64, method=method)
        f = mstep.m_objective(state.beta, state.A, W, S1, lam)
        assert (f >= f_prev - 1e-12).all()
        f_prev = f
        # the cached logits and normalisers stay those of the atoms
        fresh = mstep.AtomState.from_beta(X, state.beta, None, torch.float64)
        torch.testing.assert_close(state.logits, fresh.logits)
        torch.testing.assert_close(state.A, fresh.A)
    mom = kernels.softmax_moments(X, state.beta, order=1)
    g = mstep.m_gradient(state.beta, mom.m, W, S1, lam)
    assert g.abs().max() < 1e-7
    torch.testing.assert_close(state.beta, target, rtol=0, atol=1e-3)  # the ridge pulls slightly toward 0


def test_covariance_matvec_and_cg_match_the_dense_hessian():
    X = sim.gaussian_design(250, 6, seed=8, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    beta = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mom = kernels.softmax_moments(X, beta, order=2, chunk_size=41)
    s = torch.softmax(X @ beta.T, dim=0)
    V = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    CV = kernels.covariance_matvec(X, s, mom.m, V, chunk_size=41)
    torch.testing.assert_close(CV, torch.einsum("kab,kb->ka", mom.C, V))
    torch.testing.assert_close(kernels.covariance_diagonal(X, s, mom.m), torch.diagonal(mom.C, dim1=1, dim2=2))
    W = torch.tensor([30.0, 5.0, 1.0], dtype=torch.float64)
    g = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    d_cg, iters = mstep.cg_direction(X, s, mom.m, W, 0.1, g, max_iter=50, rtol=1e-12)
    d_newton = mstep.newton_direction(g, mstep.m_hessian(mom.C, W, 0.1))
    torch.testing.assert_close(d_cg, d_newton, rtol=1e-8, atol=1e-10)
    assert iters <= 7  # CG is exact in at most L (+ rounding) steps


def test_m_step_single_token_component_stays_finite():
    """A component that owns one token: mu on the hull's boundary; the ridge keeps beta finite."""
    X = sim.gaussian_design(200, 3, seed=6, dtype=torch.float64)
    W = torch.tensor([100.0], dtype=torch.float64)
    j = int(X.norm(dim=1).argmax())  # the farthest row is a vertex of the convex hull
    S1 = W[:, None] * X[j : j + 1]
    state = mstep.AtomState.from_beta(X, torch.zeros(1, 3, dtype=torch.float64), None, torch.float64)
    for _ in range(30):
        state, _ = mstep.newton_m_step(X, state, W, S1, 1e-2, dtype=torch.float64)
    assert torch.isfinite(state.beta).all() and torch.isfinite(state.A).all()
    s = torch.softmax(X @ state.beta[0], 0)
    assert int(s.argmax()) == j and float(s[j]) > 0.5
