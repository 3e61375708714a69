"""Data-driven starts: k-means of the frequent tokens' whitened embeddings, random atoms."""

import torch

from torch_softmix import EMFitter, TokenCounts
from torch_softmix import simulate as sim
from torch_softmix.moments import Whitening
from torch_softmix.starts import kmeans_start, kmeans_starts, random_start, weighted_kmeans


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


def test_kmeans_starts_match_their_clusters_together_as_one_by_one():
    """The batched moment matches of several k-means starts solve each start's own problem: every atom's mean
    embedding matches its cluster's, as when the start is made alone (same k-means draw)."""
    X = sim.gaussian_design(8000, 8, seed=4, dtype=torch.float64)
    truth = sim.random_mixture(3, 8, norm=2.0, separation=2.0, min_weight=0.15, seed=5)
    counts = TokenCounts.from_dense(sim.sample_counts(sim.make_head(X, truth), 10**5, seed=6))
    w = Whitening.from_design(X)
    kw = dict(whitening=w, dtype=torch.float64, newton_steps=30, top=200)
    together = kmeans_starts(X, counts, 3, 5, torch.Generator().manual_seed(0), **kw)
    alone = kmeans_start(X, counts, 3, torch.Generator().manual_seed(0), **kw)  # the first draw of the same stream
    assert len(together) == 5
    for alpha, beta in together:
        assert alpha.shape == (3,) and beta.shape == (3, 8) and abs(float(alpha.sum()) - 1) < 1e-9
    assert torch.equal(together[0][0], alone[0])
    assert torch.allclose(together[0][1], alone[1], atol=1e-6)
    assert not torch.allclose(together[0][1], together[1][1])  # other draws, other starts


def test_many_starts_are_screened_by_successive_halving():
    """With more starts than finalists, all are scored after a few EM iterations and only the finalists run the
    whole screening; the start kept is the best finalist, and the record lists every start."""
    from torch_softmix import search

    X = sim.gaussian_design(6000, 8, seed=7, dtype=torch.float64)
    truth = sim.random_mixture(3, 8, norm=2.5, separation=2.0, min_weight=0.15, seed=8)
    counts = sim.sample_counts(sim.make_head(X, truth), 10**5, seed=9)
    seen: dict[str, int] = {}

    def count(event):
        if event.phase == "screening":
            seen[event.start] = max(seen.get(event.start, 0), event.n_iter)

    n = search.SCREEN_FINALISTS + 4
    f = EMFitter(3, init="random", n_init=n, init_max_iter=8, polish_iter=0, n_moves=0, random_state=0)
    f.fit(X, counts=counts, callback=count)
    assert len(f.init_names_) == n and len(f.init_results_) == n
    finalists = [name for name, it in seen.items() if it > search.SCREEN_FIRST_ITERS]
    assert len(finalists) == search.SCREEN_FINALISTS
    assert all(seen[name] <= search.SCREEN_FIRST_ITERS for name in set(f.init_names_) - set(finalists))
    best = f.init_names_[f.best_init_]
    assert best in finalists
    assert f.init_results_[f.best_init_] == max(f.init_results_[f.init_names_.index(m)] for m in finalists)
