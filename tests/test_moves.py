"""Split-and-merge moves: a wrong basin (one atom on two laws, two atoms on one) is left for the oracle's."""

import pytest
import torch

from torch_softmix import EMFitter, TokenCounts, search
from torch_softmix import simulate as sim
from torch_softmix.moves import (
    apply_move,
    atoms_for,
    build_pieces,
    candidate_moves,
    ranked_moves,
    shares,
    transfer_starts,
)
from torch_softmix.starts import weighted_kmeans

L = 16


@pytest.fixture(scope="module")
def stuck():
    """Peaked laws; the start merges components 0 and 1 into one atom and splits component 2 into two."""
    X = sim.gaussian_design(3000, L, seed=0, dtype=torch.float64)
    truth = sim.random_mixture(3, L, norm=6.0, separation=4.2, min_weight=0.2, seed=3)
    counts = sim.sample_counts(sim.make_head(X, truth, dtype=torch.float64), 100_000, seed=3)
    b = truth["beta"]
    d = 0.3 * torch.randn(L, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    bad = {"alpha": torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64),
           "beta": torch.stack([(b[0] + b[1]) / 2, b[2] + d, b[2] - d])}  # fmt: skip
    oracle = EMFitter(3, init=truth, n_moves=0, n_transfers=0).fit(X, counts=counts)
    return X, truth, counts, bad, oracle.fit_info["objective_per_token"]


def test_without_moves_the_fit_stays_in_the_wrong_basin(stuck):
    X, truth, counts, bad, best = stuck
    f = EMFitter(3, init=bad, n_moves=0, n_transfers=0)
    f.fit(X, counts=counts)
    assert f.converged_
    assert f.objective_ < best - 1e-3
    assert f.moves_ is None


def test_moves_reach_the_oracle_and_keep_the_fit_monotone(stuck):
    X, truth, counts, bad, best = stuck
    stuck_fit = EMFitter(3, init=bad, n_moves=0, n_transfers=0).fit(X, counts=counts)
    events = []
    f = EMFitter(3, init=bad, random_state=0, n_transfers=0)  # the moves alone
    head = f.fit(X, counts=counts, callback=events.append)
    assert f.objective_ == pytest.approx(best, abs=1e-8)
    assert f.moves_["kept"] >= 1 and f.moves_["gain"] > 1e-3
    assert head.fit_info["moves"]["kept"] == f.moves_["kept"]
    ev = sim.evaluate(head, sim.make_head(X, truth, dtype=torch.float64))
    assert ev["weight_error"] < 0.02
    moved = [e.objective for e in events if e.phase == "move"]
    assert moved and all(b > a for a, b in zip(moved, moved[1:]))
    assert moved[0] > stuck_fit.fit_info["objective_per_token"]
    obj = [h["objective"] for h in f.history_]  # accepted iterates only: one entry per kept move
    assert all(b >= a - 1e-12 for a, b in zip(obj, obj[1:]))
    assert sum(h.get("phase") == "move" for h in f.history_) == f.moves_["kept"]
    # every move is tried each round; only the best screened are run to convergence, one at least per kept move
    m = f.moves_
    assert m["tried"] == m["rounds"] * 3 * 2**2  # K (K - 1)^2 / 2 moves x 2 ways to split
    assert m["kept"] <= m["continued"] <= m["rounds"] * f.n_moves < m["tried"]


def test_every_move_is_listed_ranked_and_built_from_shared_pieces(stuck):
    X, truth, counts, bad, best = stuck
    f = EMFitter(3, init=bad, n_moves=0, n_transfers=0)
    f.fit(X, counts=counts)
    problem, _ = f._problem(X, None, None, counts)
    point = problem.evaluate(problem.state(f.head_.alpha.detach().double(), f.head_.beta.detach().double()))
    moves = candidate_moves(problem, point)
    assert len(moves) == 3 * 2**2 // 2 * 2  # K (K - 1)^2 / 2 moves, each split two ways
    assert {m.how for m in moves} == {"kmeans", "peak"}
    assert len({(m.merge, m.split, m.how) for m in moves}) == len(moves)
    scores = [m.score for m in moves]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    assert all(m.split not in m.merge or m.split == m.merge[0] for m in moves)
    assert candidate_moves(problem, point, 2) == moves[:4]
    pieces = build_pieces(problem, point, moves, torch.Generator().manual_seed(0))
    assert len(pieces.merges) == 3 and len(pieces.splits) == (3 + 3) * 2  # each pair merged; each group split 2 ways
    objectives = []
    for m in moves:
        alpha, beta = apply_move(point, m, pieces)
        assert alpha.shape == (3,) and beta.shape == (3, L)
        assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12) and torch.isfinite(beta).all()
        untouched = [k for k in range(3) if k not in (*m.merge, m.split)]
        assert torch.equal(beta[untouched], point.state.beta[untouched])
        objectives.append(problem.evaluate(problem.state(alpha, beta)).objective)
    # the move that undoes the start (merge the split component's two atoms, split the merged one) is among them,
    # and it starts higher than the stuck fit's end
    assert max(objectives) > point.objective
    # ranked by their objective as built (computed from the pieces' cached laws): the same order as evaluated
    ranked = ranked_moves(problem, point, torch.Generator().manual_seed(0), 5)
    assert len(ranked) == 5
    exact = [problem.evaluate(problem.state(a, b)).objective for a, b in ranked]
    assert exact == pytest.approx(sorted(objectives, reverse=True)[:5], abs=1e-9)


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_bad_n_moves_is_refused(stuck, bad):
    X, truth, counts, _, _ = stuck
    with pytest.raises(ValueError, match="n_moves must be an int >= 0"):
        EMFitter(3, n_moves=bad).fit(X, counts=counts)


# ---------------------------------------------------------------------- transfers
@pytest.fixture(scope="module")
def misowned():
    """A fit whose start hands a k-means half of component 0's frequent tokens to component 1 (the truth's
    hard partition otherwise, each group moment-matched): EM alone stays below the truth's optimum."""
    X = sim.gaussian_design(3000, L, seed=7, dtype=torch.float64)
    truth = sim.random_mixture(3, L, norm=6.0, separation=3.0, min_weight=0.2, seed=7)
    counts = sim.sample_counts(sim.make_head(X, truth, dtype=torch.float64), 100_000, seed=7)
    oracle = EMFitter(3, init=truth, n_moves=0, n_transfers=0).fit(X, counts=counts).fit_info["objective_per_token"]
    problem, _ = EMFitter(3, init=truth)._problem(X, None, None, TokenCounts.from_dense(counts))
    R, _ = shares(problem, problem.evaluate(problem.state(truth["alpha"], truth["beta"])))
    hard = torch.zeros_like(R)
    hard[torch.arange(R.shape[0]), R.argmax(1)] = problem.counts.values
    top = torch.argsort(hard[:, 0], descending=True)[:100]
    labels, _ = weighted_kmeans(X[problem.counts.support[top]], hard[top, 0], 2, torch.Generator().manual_seed(0))
    part = top[labels == 0]
    hard[part, 1] += hard[part, 0]
    hard[part, 0] = 0
    W = hard.sum(0)
    beta = atoms_for(problem, hard)
    return X, counts, {"alpha": W / W.sum(), "beta": beta}, oracle


def test_transfers_alone_lift_a_fit_with_misowned_tokens_to_the_truths_optimum(misowned):
    X, counts, bad, oracle = misowned
    stuck = EMFitter(3, init=bad, n_moves=0, n_transfers=0).fit(X, counts=counts).fit_info["objective_per_token"]
    assert stuck < oracle - 3e-5
    events = []
    f = EMFitter(3, init=bad, random_state=0, n_moves=0, n_transfers=3)
    f.fit(X, counts=counts, callback=events.append)
    assert f.objective_ >= oracle - 1e-8  # the truth's optimum (or a better one) is reached
    m = f.moves_
    assert m["kept"] >= 1 and m["transfers"] == m["tried"] and m["continued"] <= m["rounds"] * search.MOVE_FINALISTS
    moved = [e.objective for e in events if e.phase == "move"]
    assert moved[0] > stuck and all(b > a for a, b in zip(moved, moved[1:]))


def test_transfer_starts_move_one_part_between_two_components_best_first(misowned):
    X, counts, bad, _ = misowned
    f = EMFitter(3, init=bad, n_moves=0, n_transfers=0)
    f.fit(X, counts=counts)
    problem, _ = f._problem(X, None, None, TokenCounts.from_dense(counts))
    point = problem.evaluate(problem.state(f.head_.alpha.detach().double(), f.head_.beta.detach().double()))
    starts = transfer_starts(problem, point, 4, torch.Generator().manual_seed(0))
    assert 2 <= len(starts) <= 8  # at most 4 of each kind (k-means halves, companions)
    objectives = []
    alpha0 = point.stats.W / point.stats.W.sum()  # the weights the data gives before any transfer
    for alpha, beta in starts:
        assert alpha.shape == (3,) and beta.shape == (3, L) and torch.isfinite(beta).all()
        assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12) and bool((alpha > 0).all())
        moved = (alpha - alpha0).abs() > 1e-12
        assert int(moved.sum()) == 2  # data goes from the source to the receiver ...
        assert torch.equal(beta[~moved], point.state.beta[~moved])  # ... and the third atom is untouched
        objectives.append(problem.evaluate(problem.state(alpha, beta)).objective)
    assert all(b <= a + 1e-10 for a, b in zip(objectives, objectives[1:]))  # ranked by the exact objective
    assert transfer_starts(problem, point, 0, torch.Generator()) == []


@pytest.mark.parametrize("bad", [-1, 0.5, "3"])
def test_bad_n_transfers_is_refused(stuck, bad):
    X, truth, counts, _, _ = stuck
    with pytest.raises(ValueError, match="n_transfers must be an int >= 0"):
        EMFitter(3, n_transfers=bad).fit(X, counts=counts)
