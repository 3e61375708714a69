"""Synthetic truths and metrics."""

import torch

from torch_softmix import simulate as sim


def test_matching_undoes_a_permutation():
    truth = sim.random_mixture(5, 4, norm=2.0, separation=1.0, seed=0)
    perm = torch.tensor([3, 0, 4, 1, 2])
    shuffled = torch.empty_like(truth["beta"])
    shuffled[perm] = truth["beta"]
    got = sim.match_components(shuffled, truth["beta"])
    assert torch.equal(got, perm)
    assert sim.atom_errors(shuffled, truth["beta"])["max"] == 0.0


def test_random_mixture_respects_norm_separation_and_weights():
    t = sim.random_mixture(4, 6, norm=3.0, separation=2.5, min_weight=0.1, seed=1)
    torch.testing.assert_close(t["beta"].norm(dim=1), torch.full((4,), 3.0, dtype=torch.float64))
    assert float(torch.pdist(t["beta"]).min()) >= 2.5
    assert float(t["alpha"].min()) >= 0.1 and abs(float(t["alpha"].sum()) - 1) < 1e-12


def test_law_distances():
    X = sim.gaussian_design(100, 3, seed=0, dtype=torch.float64)
    a = sim.make_head(X, sim.random_mixture(2, 3, seed=1)).log_probs()
    b = sim.make_head(X, sim.random_mixture(2, 3, seed=2)).log_probs()
    assert sim.tv_distance(a, a) == 0 and sim.kl_divergence(a, a) == 0
    tv, kl = sim.tv_distance(a, b), sim.kl_divergence(a, b)
    assert 0 < tv < 1 and kl > 0
    assert tv <= (kl / 2) ** 0.5 + 1e-12  # Pinsker


def test_sample_counts_total_and_seed():
    X = sim.gaussian_design(50, 3, seed=0)
    head = sim.make_head(X, sim.random_mixture(2, 3, seed=1))
    c1, c2 = sim.sample_counts(head, 1000, seed=5), sim.sample_counts(head, 1000, seed=5)
    assert int(c1.sum()) == 1000 and torch.equal(c1, c2)


def test_perturbed_start_moves_each_atom_by_the_asked_fraction():
    truth = sim.random_mixture(3, 5, norm=2.0, seed=0)
    start = sim.perturbed_start(truth, 0.3, seed=1)
    moved = (start["beta"] - truth["beta"]).norm(dim=1) / truth["beta"].norm(dim=1)
    torch.testing.assert_close(moved, torch.full((3,), 0.3, dtype=torch.float64))
    assert torch.equal(start["beta"], sim.perturbed_start(truth, 0.3, seed=1)["beta"])
    torch.testing.assert_close(start["alpha"], torch.full((3,), 1 / 3, dtype=torch.float64))
