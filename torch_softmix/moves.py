"""Split-and-merge moves: leaving a local optimum where one component covers two laws and two cover one.

On LM next-token mixtures the typical wrong basin pairs a *merged* component (one atom fitted to the tokens
of two prompts) with a *split* one (two atoms sharing one prompt's tokens). No small step leaves it: EM and
L-BFGS both stop there. A move re-partitions the data of a few components at once (Ueda, Nakano, Ghahramani
& Hinton, "SMEM algorithm for mixture models", 2000), and the fit is continued from the moved point; the
search (:func:`torch_softmix.search.refine`) keeps a move only when the objective rises.

Everything is computed from one E-step at the current point, on the support of the counts:

* ``R (S, K)``: the counts shared out by responsibility, ``n_j gamma_jk``;
* split score of ``k``: ``KL(f_k || s_k)`` between the component's share of the data ``f_k = R_k / W_k`` and its
  own law ``s_k``: large when one atom explains tokens of two laws;
* merge score of ``(i, j)``: the cosine of ``R_i`` and ``R_j`` weighted by ``1 / n``: large when two atoms
  take turns on the same tokens.

A move ``(merge=(i, j), split=k)`` gives ``i`` and ``j``'s data one atom (their moment match) and ``k``'s data
two (two groups of its tokens, moment-matched, then a few EM iterations on that data alone); ``k`` may be ``i``
itself (the pair's data re-split afresh), which is the only kind of move when ``K = 2``. Each split is made two
ways: k-means of the data's frequent tokens, and its most frequent token against the rest ("peak").

The scores rank moves poorly on LM mixtures (from a stuck SmolLM2 fit, the moves that raised the objective were
rarely the best-scored), so a round tries every move there is, ``K (K - 1)^2 / 2`` of them, and the fit screens
them by the objective a few EM iterations later. Moves share their parts: a round has ``K`` single splits,
``K (K - 1) / 2`` pair re-splits and as many merges, whatever the number of moves. :func:`build_pieces` builds
each part once, and fits all the atoms together (:data:`PIECE_ATOMS` per batch): each pass over ``X`` then
carries many columns, where one move at a time would read ``X`` for one or two. :func:`apply_move` assembles a
move's start from the parts.

A *transfer* keeps every component but hands a group of one component's tokens to another: the other typical
wrong basin on LM mixtures has a few of one law's tokens (a few percent of the data) owned by the wrong
component, and EM does not move them back one token at a time. Two kinds of groups are offered: the two
k-means halves of a component's frequent tokens (to every other component), and a frequent token with its
*companions* (to one other component): the tokens whose probability under the receiver rises most when the
receiver's atom takes a Newton step toward that token. On a near-deterministic prompt the misowned tokens are
such a group but not a k-means cluster. :func:`transfer_starts` scores every transfer exactly after re-fitting
the two atoms concerned (a few Newton-CG steps preconditioned by the current curvature, many transfers at
once) and returns the best of each kind as starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import curvature, kernels
from .data import TokenCounts
from .engine import FitProblem, Point
from .mstep import AtomState, diagonal_solver, newton_m_step
from .objective import per_token_objective
from .starts import frequent_rows, weighted_kmeans

#: A split's k-means clusters this many of its data's most frequent tokens (as the k-means start does).
SPLIT_TOP = 300
#: Newton steps of the moment matches that start every new atom (a merge, either half of a split).
MATCH_STEPS = 8
#: EM iterations of each split's two-component fit on its own data (all splits of a round at once).
SPLIT_EM_ITERS = 5
#: Atoms fitted together when a round's pieces are built: their logits are ``p x`` this many float64.
PIECE_ATOMS = 64
#: A round builds at most this many trials (moves x two ways to split): ``K (K - 1)^2`` of them exist, 36 at
#: ``K = 4``, 392 at ``K = 8``. Beyond it the best-scored moves are taken.
MAX_MOVE_TRIALS = 400
#: A component's most frequent tokens (by its share of the data) split in two for its transfers.
TRANSFER_TOP = 300
#: Damped Newton steps (the M-step's) re-fitting the atoms for a transfer's score. Three ranked the right group
#: of a near-deterministic prompt's tail 9th of 20 (its receiving atom, peaked, moves slowly); six ranked it first.
TRANSFER_STEPS = 6
#: The most frequent tokens of a component that lead a group of companions to each other component.
TRANSFER_LEADS = 5
#: Sizes of the companion groups (the lead token's companions, the lead not counted).
TRANSFER_COMPANIONS = (3, 7)
#: Transfers re-fitted at once (``2 x`` this many atoms: their logits ``p x 2 x`` this many float64, and as many
#: ``L x L`` float64 blocks of the preconditioner).
TRANSFER_BATCH = 16
#: A transfer hands over at most this share of the source component's data (more is a merge, not a transfer).
TRANSFER_MAX_SHARE = 0.9


@dataclass(frozen=True)
class Move:
    """Merge components ``merge = (i, j)`` into one and split ``split`` into two (``split`` may be ``i``)."""

    merge: tuple[int, int]
    split: int
    score: float
    how: str = "kmeans"  # "kmeans": two clusters of the data's frequent tokens; "peak": its top token vs the rest


def shares(problem: FitProblem, point: Point) -> tuple[Tensor, Tensor]:
    """``R (S, K)`` (counts shared out by responsibility) and ``log s (S, K)`` (component laws) on the support."""
    st, c = point.state, problem.counts
    log_s = st.atoms.logits.index_select(0, c.support) - st.atoms.A
    joint = log_s + st.log_alpha
    gamma = torch.exp(joint - torch.logsumexp(joint, 1, keepdim=True))
    return c.values[:, None] * gamma, log_s


def candidate_moves(problem: FitProblem, point: Point, n_moves: int | None = None) -> list[Move]:
    """Every move (or the ``n_moves`` best-scored ones), each split two ways, best score first.

    The score is the split score times the merge score (see the module's docstring); the fit screens every
    move it lists by the objective after a few EM iterations, so the score only orders the list and, where a
    round would list too many moves (:data:`MAX_MOVE_TRIALS`), chooses which are built.
    """
    R, log_s = shares(problem, point)
    comm = problem.comm
    K = R.shape[1]
    if K < 2:
        return []
    W = kernels.allsum(R.sum(0), comm, "moves_W")
    f = R / W.clamp_min(1e-300)
    split = kernels.allsum((f * (torch.log(f.clamp_min(1e-300)) - log_s)).sum(0), comm, "moves_split")
    n = problem.counts.values[:, None]
    gram = kernels.allsum(R.T @ (R / n), comm, "moves_gram")
    norm = gram.diagonal().clamp_min(1e-300).sqrt()
    merge = gram / (norm[:, None] * norm[None, :])
    moves = []
    for i in range(K):
        for j in range(i + 1, K):
            for k in range(K):
                if k == j:
                    continue  # (i, j) re-split is listed once, as k = i
                s = float(split[k]) if k != i else float(split[i] + split[j])
                moves.append(Move((i, j), k, float(merge[i, j]) * s))
    moves.sort(key=lambda m: -m.score)
    return [Move(m.merge, m.split, m.score, how) for m in moves[:n_moves] for how in ("kmeans", "peak")]


def _m_tol(problem: FitProblem) -> float:
    """The M-step's own rule (:func:`~torch_softmix.engine.m_step`): an atom whose Newton step would gain less
    than this (units of the total objective) is left as it is, rather than backtracked to no step at all."""
    return 0.01 * problem.tol * problem.n_tokens


def match_atoms(problem: FitProblem, W: Tensor, S1: Tensor, beta: Tensor, steps: int = MATCH_STEPS) -> AtomState:
    """The moment-matched atoms of the data ``W (M,)``, ``S1 (M, L)`` (``m(beta_i) ~ S1_i / W_i``, with the fit's
    ridge), from ``beta (M, L)``: ``steps`` damped Newton-CG steps on all ``M`` atoms at once (each step's
    products over ``X`` carry the ``M`` columns together)."""
    state = AtomState.from_beta(problem.X, beta, problem.bias, problem.dtype, problem.chunk_size, problem.comm)
    state, _ = newton_m_step(
        problem.X, state, W.clamp_min(1e-12), S1, problem.lam, dtype=problem.dtype, method="newton-cg",
        max_steps=steps, tol=_m_tol(problem), cg_max_iter=problem.cg_max_iter, cg_rtol=problem.cg_rtol,
        chunk_size=problem.chunk_size, comm=problem.comm,
    )  # fmt: skip
    return state


def atoms_for(problem: FitProblem, R: Tensor, steps: int = MATCH_STEPS) -> Tensor:
    """The moment-matched atoms ``(M, L)`` of the data columns ``R (S, M)`` (counts on the support shared out
    among ``M`` groups, e.g. a hard partition), from zero: :func:`match_atoms` of their totals and first moments."""
    c = problem.counts
    W = kernels.allsum(R.sum(0), problem.comm, "atoms_W")
    S1 = kernels.allsum(kernels.weighted_sum(problem.X, R.to(problem.dtype), c.support, problem.chunk_size),
                        problem.comm, "atoms_S1").to(torch.float64)  # fmt: skip
    zero = torch.zeros(R.shape[1], problem.X.shape[1], dtype=torch.float64, device=R.device)
    return match_atoms(problem, W, S1, zero, steps).beta


def _split_data(problem: FitProblem, r: Tensor, W: Tensor, S1: Tensor, gen: torch.Generator) -> dict:
    """The two groups each way of splitting the data ``r (S,)`` (total ``W``, first moment ``S1 (L,)``):
    ``{how: (W (2,), S1 (2, L))}``.

    ``"kmeans"``: count-weighted spherical k-means of the :data:`SPLIT_TOP` most frequent tokens' whitened
    embeddings (those tokens only, as the k-means start); ``"peak"``: the most frequent token against the rest
    of the data, the start of a near-deterministic law. Over several ranks the frequent tokens are gathered
    (:func:`~torch_softmix.starts.frequent_rows`), so every rank forms the same groups.
    """
    d = problem.design
    c = problem.counts
    keep = r > 0
    _, w, Xs = frequent_rows(problem.X, TokenCounts(c.support[keep], r[keep], c.vocab_size), SPLIT_TOP, problem.comm,
                             d.lo)  # fmt: skip
    labels, _ = weighted_kmeans((Xs - d.whitening.mean) @ d.whitening.W, w, 2, gen)
    G = torch.zeros(w.numel(), 2, dtype=torch.float64, device=w.device)
    G[torch.arange(w.numel(), device=w.device), labels] = w
    peak_W = torch.stack([w[0], W - w[0]])
    peak_S1 = torch.stack([w[0] * Xs[0], S1 - w[0] * Xs[0]])
    return {"kmeans": (G.sum(0), G.T @ Xs), "peak": (peak_W, peak_S1)}


def _fit_splits(problem: FitProblem, data: Tensor, W: Tensor, S1: Tensor, beta: Tensor) -> tuple[Tensor, AtomState]:
    """Two-component fits, many at once: split ``g`` has the data ``data[:, g]`` (``data (S, G)``), groups
    ``W (G, 2)``, ``S1 (G, 2, L)`` and start ``beta (G, 2, L)``. Each pair of atoms is moment-matched to its
    groups, then :data:`SPLIT_EM_ITERS` EM iterations run on each split's own data (one pass over ``X`` per
    step for all ``2 G`` atoms). Returns the weights ``(G, 2)`` and the ``2 G`` atoms (split ``g``'s are
    ``2 g`` and ``2 g + 1``)."""
    G, L = W.shape[0], beta.shape[-1]
    c, comm = problem.counts, problem.comm
    state = match_atoms(problem, W.reshape(-1), S1.reshape(-1, L), beta.reshape(-1, L))
    log_w = torch.log(W.clamp_min(1e-300) / W.sum(1, keepdim=True).clamp_min(1e-300))
    for _ in range(SPLIT_EM_ITERS):
        log_s = (state.logits.index_select(0, c.support) - state.A).view(-1, G, 2)
        R = (torch.softmax(log_s + log_w, 2) * data[:, :, None]).reshape(-1, 2 * G)  # (S, 2G) shared out
        W_new = kernels.allsum(R.sum(0), comm, "split_W")
        S1_new = kernels.allsum(kernels.weighted_sum(problem.X, R.to(problem.dtype), c.support, problem.chunk_size),
                                comm, "split_S1").to(torch.float64)  # fmt: skip
        W2 = W_new.view(G, 2)
        log_w = torch.log(W2.clamp_min(1e-300) / W2.sum(1, keepdim=True).clamp_min(1e-300))
        state, _ = newton_m_step(
            problem.X, state, W_new.clamp_min(1e-12), S1_new, problem.lam, dtype=problem.dtype, method="newton-cg",
            tol=_m_tol(problem), cg_max_iter=problem.cg_max_iter, cg_rtol=problem.cg_rtol,
            chunk_size=problem.chunk_size, comm=comm,
        )  # fmt: skip
    return log_w.exp(), state


@dataclass
class Piece:
    """New atoms ``beta (n, L)`` for a move, their weights ``w (n,)`` within the data they share, and their
    log-laws on the support ``log_s (S, n)`` (so that a move's start is scored without a pass over ``X``)."""

    w: Tensor
    beta: Tensor
    log_s: Tensor


@dataclass
class Pieces:
    """What the moves of one round are made of, each built once: ``splits[(group, how)]`` (two atoms), a group
    being one component ``(k,)`` or a pair ``(i, j)``, and ``merges[(i, j)]`` (one atom)."""

    splits: dict[tuple, Piece]
    merges: dict[tuple[int, int], Piece]


def _group(move: Move) -> tuple[int, ...]:
    """The components whose data ``move`` splits: the pair for a re-split, else the one split."""
    return move.merge if move.split == move.merge[0] else (move.split,)


def build_pieces(problem: FitProblem, point: Point, moves: list[Move], gen: torch.Generator) -> Pieces:
    """Every split and merge that ``moves`` use, each built once and all of them batched.

    A split of a component's (or a pair's) data: its two groups (:func:`_split_data`), moment-matched and
    fitted on that data alone (:func:`_fit_splits`), started at the data's owners' weighted mean atom. A merge:
    the moment match of the pair's data, from the same mean atom. :data:`PIECE_ATOMS` atoms are fitted at once.
    """
    R, _ = shares(problem, point)
    comm, support = problem.comm, problem.counts.support
    W = kernels.allsum(R.sum(0), comm, "moves_W")
    S1 = point.stats.S1.to(torch.float64)
    beta = point.state.beta

    def mean_atom(g: tuple[int, ...]) -> Tensor:
        gi = list(g)
        return (W[gi, None] * beta[gi]).sum(0) / W[gi].sum().clamp_min(1e-300)

    def on_support(state: AtomState, cols: slice) -> Tensor:
        return state.logits[:, cols].index_select(0, support) - state.A[cols]

    wanted = {(_group(m), m.how) for m in moves}
    keys, data, Ws, S1s, starts = [], [], [], [], []
    for g in sorted({g for g, _ in wanted}):
        gi = list(g)
        r = R[:, gi].sum(1)
        ways = _split_data(problem, r, W[gi].sum(), S1[gi].sum(0), gen)
        for how in ("kmeans", "peak"):
            if (g, how) in wanted:
                keys.append((g, how))
                data.append(r)
                Ws.append(ways[how][0])
                S1s.append(ways[how][1])
                starts.append(mean_atom(g).expand(2, -1))
    splits = {}
    per = max(1, PIECE_ATOMS // 2)
    for lo in range(0, len(keys), per):
        sl = slice(lo, lo + per)
        w, state = _fit_splits(problem, torch.stack(data[sl], 1), torch.stack(Ws[sl]), torch.stack(S1s[sl]),
                               torch.stack(starts[sl]))  # fmt: skip
        for i, key in enumerate(keys[sl]):
            two = slice(2 * i, 2 * i + 2)
            splits[key] = Piece(w[i], state.beta[two], on_support(state, two))
    pairs = sorted({m.merge for m in moves if m.split != m.merge[0]})
    merges = {}
    for lo in range(0, len(pairs), PIECE_ATOMS):
        batch = pairs[lo : lo + PIECE_ATOMS]
        Wm = torch.stack([W[i] + W[j] for i, j in batch])
        S1m = torch.stack([S1[i] + S1[j] for i, j in batch])
        state = match_atoms(problem, Wm, S1m, torch.stack([mean_atom(p) for p in batch]))
        for i, p in enumerate(batch):
            merges[p] = Piece(Wm[i : i + 1] / Wm[i], state.beta[i : i + 1], on_support(state, slice(i, i + 1)))
    return Pieces(splits, merges)


def apply_move(point: Point, move: Move, pieces: Pieces, log_s: Tensor | None = None):
    """The start ``(alpha (K,), beta (K, L))`` after ``move``, from the round's ``pieces``; the other components
    keep their atoms and weights. With the current log-laws on the support ``log_s (S, K)``, also the start's
    ``(S, K)`` log-laws (from the pieces' own: no pass over ``X``)."""
    alpha = point.state.log_alpha.exp().clone()
    beta = point.state.beta.clone()
    laws = None if log_s is None else log_s.clone()
    i, j = move.merge
    k = move.split
    split = pieces.splits[(_group(move), move.how)]
    if k == i:  # re-split the pair's data: the two atoms take slots i and j
        total = alpha[i] + alpha[j]
        alpha[i], alpha[j] = total * split.w[0], total * split.w[1]
        slots = [i, j]
    else:  # the merged atom takes slot i; slot j and slot k take the split's two atoms
        merged = pieces.merges[(i, j)]
        alpha[i], beta[i] = alpha[i] + alpha[j], merged.beta[0]
        if laws is not None:
            laws[:, i] = merged.log_s[:, 0]
        ak = alpha[k].clone()
        alpha[j], alpha[k] = ak * split.w[0], ak * split.w[1]
        slots = [j, k]
    beta[slots] = split.beta
    if laws is None:
        return alpha, beta
    laws[:, slots] = split.log_s
    return alpha, beta, laws


def objective_from_laws(problem: FitProblem, log_s: Tensor, alpha: Tensor, beta: Tensor) -> float:
    """The per-token objective of weights ``alpha (K,)`` and atoms ``beta (K, L)`` whose log-laws on the support
    ``log_s (S, K)`` are known (cached from the fits that made the atoms): no pass over ``X``; over several ranks
    one all-reduce of a number."""
    ll = (problem.counts.values * torch.logsumexp(log_s + alpha.log(), 1)).sum().reshape(1)
    ll = kernels.allsum(ll, problem.comm, "moves_loglik")
    return per_token_objective(float(ll), beta, problem.lam, problem.n_tokens)


def ranked_moves(problem: FitProblem, point: Point, gen: torch.Generator, n: int) -> list[tuple[Tensor, Tensor]]:
    """The ``n`` best starts ``(alpha (K,), beta (K, L))`` of a round's moves, best first, by their objective as
    built (before any EM iteration).

    Every move is listed (at most :data:`MAX_MOVE_TRIALS` trials, the best-scored), its parts built once
    (:func:`build_pieces`), and each start's objective is computed on the support from the parts' cached
    log-laws (one all-reduce of a number per trial over several ranks).
    """
    moves = candidate_moves(problem, point, MAX_MOVE_TRIALS // 2)
    if not moves:
        return []
    pieces = build_pieces(problem, point, moves, gen)
    _, log_s = shares(problem, point)
    scored = []
    for move in moves:
        alpha, beta, laws = apply_move(point, move, pieces, log_s)
        alpha = alpha / alpha.sum()
        scored.append((objective_from_laws(problem, laws, alpha, beta), alpha, beta))
    scored.sort(key=lambda t: -t[0])
    return [(alpha, beta) for _, alpha, beta in scored[:n]]


def _refit_atoms(problem: FitProblem, atoms: AtomState, W: Tensor, S1: Tensor) -> AtomState:
    """The atoms re-fitted to the data ``W (K,)``, ``S1 (K, L)`` from ``atoms`` (whose block preconditioner,
    built at the current point, is kept): :data:`TRANSFER_STEPS` damped Newton steps of the M-step."""
    new, _ = newton_m_step(
        problem.X, atoms, W, S1, problem.lam, dtype=problem.dtype, method=problem.m_step, max_steps=TRANSFER_STEPS,
        cg_max_iter=problem.cg_max_iter, cg_rtol=problem.cg_rtol, chunk_size=problem.chunk_size,
        precondition=atoms.precond is not None, bias=problem.bias, whitening=problem.design.whitening,
    )  # fmt: skip
    return new


def _hessian_solver(problem: FitProblem, st, W: Tensor, m: Tensor, precond):
    """``V (K, L) -> (W_k C_k + lam I)^{-1} v_k`` for each component, the matrices taken at the current atoms:
    the block preconditioner ``precond`` when there is one, else the matrices' diagonals (one pass over ``X``)."""
    if precond is not None:
        return precond.solve
    s = kernels.probs_from_logits(st.atoms.logits, st.atoms.A, problem.dtype)
    return diagonal_solver(problem.X, s, m, W, max(problem.lam, 1e-12), problem.chunk_size)


def _companions(Z: Tensor, a: int, m: Tensor, solve) -> list[tuple[int, Tensor]]:
    """Groups of component ``a``'s frequent tokens ``Z (t, L)`` (most frequent first) for one receiver each:
    ``(b, positions)``.

    For each of the :data:`TRANSFER_LEADS` most frequent tokens and each receiver ``b``: the token and its
    *companions*, the tokens whose log-probability under ``b`` a Newton step of ``b`` toward the lead token
    raises most (largest ``(x_j - m_b)^T H_b^{-1} (x_lead - m_b)``, ``m (K, L)`` the component means),
    :data:`TRANSFER_COMPANIONS` of them.
    """
    K, t = m.shape[0], Z.shape[0]
    out = []
    for lead in range(min(TRANSFER_LEADS, t)):
        step = solve(Z[lead] - m)  # (K, L): each component's Newton step toward the lead token
        for b in range(K):
            if b == a:
                continue
            z = (Z - m[b]) @ step[b]
            z[lead] = float("inf")  # the lead itself always goes
            order = torch.argsort(z, descending=True)
            out += [(b, order[: 1 + size]) for size in TRANSFER_COMPANIONS if size < t - 1]
    return out


def transfer_starts(problem: FitProblem, point: Point, n: int, gen: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """The ``n`` best-scored transfers of each kind from ``point``, best first, as starts ``(alpha (K,),
    beta (K, L))``.

    A transfer hands one group of component ``a``'s :data:`TRANSFER_TOP` most frequent tokens (counts shared
    out by responsibility) to one other component ``b``, and is scored by the exact objective once ``a``'s and
    ``b``'s atoms are re-fitted to their changed data (:func:`_refit_pairs`); the other components keep theirs.
    Two kinds of groups, each ranked apart (a few tokens score close to the current point and would crowd out
    the halves, whose receivers have further to go):

    * ``"halves"``: the two k-means halves of ``a``'s tokens, each offered to every ``b``;
    * ``"companions"``: a frequent token with its companions (:func:`_companions`), offered to one ``b``.

    One process only (the fit skips transfers, not moves, when the vocabulary is shared among ranks). Cost: the
    block preconditioner and the component means once, then about ``8 TRANSFER_STEPS`` passes over ``X`` per
    :data:`TRANSFER_BATCH` transfers, for ``2 K (K - 1) (1 + TRANSFER_LEADS len(TRANSFER_COMPANIONS))``
    transfers.
    """
    st, c = point.state, problem.counts
    R, log_s = shares(problem, point)
    K = R.shape[1]
    if K < 2 or n <= 0:
        return []
    W, S1 = R.sum(0), point.stats.S1.to(torch.float64)
    d = problem.design
    precond = None
    if curvature.usable(d, K):
        precond = curvature.BlockPreconditioner.build(problem.X, st.beta, W, problem.lam, problem.bias, d.whitening,
                                                      problem.dtype, problem.chunk_size, None)  # fmt: skip
    atoms = AtomState(st.beta, st.atoms.logits, st.atoms.A, precond)
    s = kernels.probs_from_logits(st.atoms.logits, st.atoms.A, problem.dtype)
    m = kernels.weighted_sum(problem.X, s, chunk_size=problem.chunk_size).to(torch.float64)  # (K, L) the means
    del s
    solve = _hessian_solver(problem, st, W, m, precond)
    transfers = []  # (a, b, dW, dS1, kind)
    for a in range(K):
        top = torch.argsort(R[:, a], descending=True)[:TRANSFER_TOP]
        top = top[R[top, a] > 0]
        if top.numel() < 2:
            continue
        X_top = problem.X.index_select(0, c.support[top]).to(torch.float64)
        labels, _ = weighted_kmeans((X_top - d.whitening.mean) @ d.whitening.W, R[top, a], 2, gen)
        halves = [(b, torch.nonzero(labels == g).squeeze(1), "halves") for g in (0, 1) for b in range(K) if b != a]
        for b, pos, kind in halves + [(b, pos, "companions") for b, pos in _companions(X_top, a, m, solve)]:
            dW = float(R[top[pos], a].sum())
            if 0 < pos.numel() < top.numel() and dW <= TRANSFER_MAX_SHARE * float(W[a]):
                transfers.append((a, b, dW, R[top[pos], a] @ X_top[pos], kind))
    best: dict[str, list] = {"halves": [], "companions": []}  # per kind: the n best (score, alpha, beta) so far
    for lo in range(0, len(transfers), TRANSFER_BATCH):
        batch = transfers[lo : lo + TRANSFER_BATCH]
        new, new_log_s = _refit_pairs(problem, atoms, W, S1, batch)
        for i, (a, b, dW, _, kind) in enumerate(batch):
            alpha, beta = _transferred(W, st.beta, a, b, dW, new[2 * i], new[2 * i + 1])
            cols = log_s.clone()
            cols[:, a], cols[:, b] = new_log_s[:, 2 * i], new_log_s[:, 2 * i + 1]
            best[kind].append((objective_from_laws(problem, cols, alpha, beta), alpha, beta))
            best[kind].sort(key=lambda t: -t[0])
            del best[kind][n:]
    ranked = sorted(best["halves"] + best["companions"], key=lambda t: -t[0])
    return [(alpha, beta) for _, alpha, beta in ranked]


def _transferred(W: Tensor, beta: Tensor, a: int, b: int, dW: float, beta_a: Tensor, beta_b: Tensor):
    """The weights ``(K,)`` and atoms ``(K, L)`` after ``dW`` of the data goes from ``a`` to ``b`` and their atoms
    become ``beta_a``, ``beta_b``."""
    alpha = W.clone()
    alpha[a] -= dW
    alpha[b] += dW
    new = beta.clone()
    new[a], new[b] = beta_a, beta_b
    return alpha / alpha.sum(), new


def _refit_pairs(problem: FitProblem, atoms: AtomState, W: Tensor, S1: Tensor, pairs: list) -> tuple[Tensor, Tensor]:
    """Re-fit the two atoms of each transfer ``(a, b, dW, dS1, ...)`` in ``pairs`` to their changed data, at once.

    ``atoms``: the current ones (with the block preconditioner, if any); ``W (K,)``, ``S1 (K, L)``: the current
    data. The M-step's :data:`TRANSFER_STEPS` damped Newton steps on ``2 n`` columns, each preconditioned by
    its component's block. Returns the atoms ``(2 n, L)`` (``a``'s then ``b``'s for each transfer) and their
    laws on the support ``(S, 2 n)``.
    """
    k = torch.tensor([j for a, b, *_ in pairs for j in (a, b)], device=W.device)
    dW = torch.tensor([x for _, _, w, *_ in pairs for x in (-w, w)], dtype=torch.float64, device=W.device)
    dS1 = torch.stack([x for _, _, _, v, *_ in pairs for x in (-v, v)])
    pre = atoms.precond
    if pre is not None:
        pre = curvature.BlockPreconditioner(pre.beta[k], pre.W[k], pre.chol[k], pre.age)
    cols = AtomState(atoms.beta[k], atoms.logits[:, k], atoms.A[k], pre)
    new = _refit_atoms(problem, cols, (W[k] + dW).clamp_min(0.0), S1[k] + dS1)
    return new.beta, new.logits.index_select(0, problem.counts.support) - new.A
