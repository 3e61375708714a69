"""SoftmaxMixtureHead: laws, shapes, dtypes, sampling, no copy of the embedding."""

import math

import pytest
import torch
from scipy.stats import chisquare

from torch_softmix import SoftmaxMixtureHead
from torch_softmix import simulate as sim


def _dense_reference(X, alpha, beta):
    comp = torch.log_softmax(X @ beta.T, dim=0)  # (p, K)
    return torch.logsumexp(torch.log(alpha) + comp, dim=1), comp


def test_laws_match_a_dense_reference(small_problem):
    X, truth = small_problem
    head = sim.make_head(X, truth, chunk_size=33)
    ref, comp = _dense_reference(X, truth["alpha"], truth["beta"])
    torch.testing.assert_close(head.log_probs(), ref)
    torch.testing.assert_close(head.component_log_probs(), comp)
    assert math.isclose(float(head.log_probs().detach().exp().sum()), 1.0, rel_tol=1e-12)
    tokens = torch.tensor([[0, 5, 7], [399, 1, 1]])
    lp = head.log_prob(tokens)
    assert lp.shape == (2, 3)
    torch.testing.assert_close(lp, ref[tokens])
    assert head.component_log_probs(tokens).shape == (2, 3, 3)
    assert head.forward(torch.zeros(2, 5, 6)).shape == (2, 5, 400)


def test_responsibilities_are_bayes_posteriors(small_problem):
    X, truth = small_problem
    head = sim.make_head(X, truth)
    _, comp = _dense_reference(X, truth["alpha"], truth["beta"])
    post = torch.softmax(torch.log(truth["alpha"]) + comp, dim=1)
    tokens = torch.tensor([3, 9, 200])
    torch.testing.assert_close(head.responsibilities(tokens=tokens), post[tokens])
    counts = torch.zeros(400, dtype=torch.long)
    counts[[9, 3, 200]] = 2
    torch.testing.assert_close(head.responsibilities(counts=counts), post[torch.tensor([3, 9, 200])])


def test_embedding_is_shared_not_copied_and_frozen(small_problem):
    X, truth = small_problem
    weight = torch.nn.Parameter(X.clone())
    head = SoftmaxMixtureHead(weight, 3)
    assert head.embedding.data_ptr() == weight.data_ptr()
    assert not head.embedding.requires_grad
    assert set(dict(head.named_parameters())) == {"log_alpha", "beta"}
    assert set(head.state_dict()) == {"log_alpha", "beta"}
    head.log_probs().sum().backward()
    assert weight.grad is None and head.beta.grad is not None


def test_gradients_flow_and_match_autograd_reference(small_problem):
    X, truth = small_problem
    head = sim.make_head(X, truth, chunk_size=50)
    tokens = torch.tensor([1, 2, 3, 3])
    head.log_prob(tokens).sum().backward()
    beta = truth["beta"].clone().requires_grad_(True)
    la = torch.log(truth["alpha"]).clone().requires_grad_(True)
    comp = torch.log_softmax(X @ beta.T, dim=0)
    torch.logsumexp(torch.log_softmax(la, 0) + comp, dim=1)[tokens].sum().backward()
    torch.testing.assert_close(head.beta.grad, beta.grad)
    torch.testing.assert_close(head.log_alpha.grad, la.grad)


def test_k_equals_one_and_dtypes(small_problem):
    X, _ = small_problem
    head = SoftmaxMixtureHead(X.float(), 1, beta=torch.ones(1, 6))
    assert head.beta.dtype == torch.float32 and head.alpha.item() == 1.0
    torch.testing.assert_close(head.log_probs(), torch.log_softmax(X.float() @ torch.ones(6), 0))
    h64 = head.to(torch.float64)
    assert h64.log_probs().dtype == torch.float64
    half = SoftmaxMixtureHead(X.to(torch.bfloat16), 2)
    assert half.beta.dtype == torch.float32 and half.log_probs().dtype == torch.float32


def test_sample_frequencies_agree_with_log_probs():
    X = sim.gaussian_design(40, 3, seed=20, dtype=torch.float64)
    truth = sim.random_mixture(2, 3, norm=1.5, seed=21)
    head = sim.make_head(X, truth)
    n = 200_000
    tokens = head.sample(n, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (n,) and tokens.dtype == torch.int64
    observed = torch.bincount(tokens, minlength=40).numpy()
    expected = head.log_probs().detach().exp().numpy() * n
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3
    again = head.sample(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_head_runs_on_each_device(device, small_problem):
    X, truth = small_problem
    head = sim.make_head(X.to(device), truth).to(device)
    ref = sim.make_head(X, truth).log_probs()
    torch.testing.assert_close(head.log_probs().cpu(), ref)


def test_non_finite_embedding_row_is_refused_at_construction():
    X = torch.randn(500, 4, dtype=torch.float64)
    X[137, 2] = float("inf")
    with pytest.raises(ValueError, match="row 137"):
        SoftmaxMixtureHead(X, 2)
    head = SoftmaxMixtureHead(X, 2, validate_args=False)  # as torch.distributions: the check can be skipped
    assert head.vocab_size == 500
    with pytest.raises(ValueError, match="bias contains NaN"):
        SoftmaxMixtureHead(torch.randn(50, 3), 1, torch.full((50,), float("nan")))


def test_data_arguments_come_in_the_same_order_everywhere():
    X = torch.randn(40, 3, dtype=torch.float64)
    head = SoftmaxMixtureHead(X, 2, beta=torch.randn(2, 3, dtype=torch.float64))
    counts = torch.zeros(40, dtype=torch.long)
    counts[[3, 9, 20]] = torch.tensor([2, 1, 5])
    post = head.responsibilities(counts)  # positional: counts, as in loglik(counts)
    assert post.shape == (3, 2)
    torch.testing.assert_close(post, head.responsibilities(counts=counts))
    torch.testing.assert_close(head.loglik(counts), head.loglik(tokens=torch.tensor([3, 3, 9, 20, 20, 20, 20, 20])))
