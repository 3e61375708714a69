"""Data-driven starts: k-means of the frequent tokens' whitened embeddings, random atoms."""

import torch

from torch_softmix import EMFitter, TokenCounts
from torch_softmix import simulate as sim
from torch_softmix.moments import Whitening
from torch_softmix.starts import kmeans_start, random_start, weighted_kmeans


def test_weighted_kmeans_separates_clear_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]], dtype=torch.float64)
    Y = torch.cat([c + 0.3 * torch.randn(50, 3, generator=g, dtype=torch.float64) for c in centres])
    labels, _ = weighted_kmeans(Y, torch.ones(150, dtype=torch.float64), 3, torch.Generator().manual_seed(1))
    for block in labels.reshape(3, 50):
        assert len(set(block.tolist())) == 1
    assert len(set(labels.tolist())) == 3


def test_kmeans_start_then_em_reaches_the_oracle():
    X = sim.gaussian_design(20_000, 16, seed=0, dtype=torch.float64)
    truth = sim.random_mixture(3, 16, norm=3.0, separation=2.0, min_weight=0.15, seed=1)
    true_head = sim.make_head(X, truth)
    counts = sim.sample_counts(true_head, 10**6, seed=2)
    alpha, beta = kmeans_start(
        X,
        TokenCounts.from_dense(counts),
        3,
        torch.Generator().manual_seed(0),
        whitening=Whitening.from_design(X),
        dtype=torch.float64,
    )
    assert alpha.shape == (3,) and beta.shape == (3, 16) and abs(float(alpha.sum()) - 1) < 1e-9
    oracle = EMFitter(3, init=truth).fit(X, counts=counts)
    fitter = EMFitter(3, init="kmeans", n_init=2, random_state=0)
    fit = fitter.fit(X, counts=counts)
    assert fitter.init_names_ == ["kmeans-0", "kmeans-1"]
    err, err_o = (sim.evaluate(h, true_head)["atom_error_max"] for h in (fit, oracle))
    assert err <= 1.1 * err_o


def test_random_start_has_unit_logit_spread():
    X = sim.gaussian_design(5000, 8, seed=3, dtype=torch.float64) * 4.0
    alpha, beta = random_start(X, 200, torch.Generator().manual_seed(0))
    spread = (X @ beta.T).std(dim=0).mean()
    assert 0.8 < float(spread) < 1.2 and torch.allclose(alpha, torch.full((200,), 1 / 200, dtype=torch.float64))
