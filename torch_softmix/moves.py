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
two (k-means of its frequent tokens, then a few EM iterations on that data alone); ``k`` may be ``i`` itself
(the pair's data re-split afresh), which is the only kind of move when ``K = 2``.

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
from .engine import FitProblem, Point, run
from .mstep import AtomState, diagonal_solver, newton_m_step
from .objective import per_token_objective
from .starts import frequent_rows, kmeans_start, weighted_kmeans

#: EM iterations of the two-component fit that splits one component's data.
SPLIT_EM_ITERS = 20
#: Newton steps of a merged atom's moment match.
MERGE_NEWTON_STEPS = 8
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


def candidate_moves(problem: FitProblem, point: Point, n_moves: int) -> list[Move]:
    """The ``n_moves`` most promising moves, best first (ranked by split score times merge score)."""
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


def _merged_atom(problem: FitProblem, beta: Tensor, R: Tensor, W: Tensor) -> Tensor:
    """The moment-matched atom of the data ``R (S,)`` (total ``W``), from ``beta (L,)``."""
    c = problem.counts
    S1 = kernels.allsum(kernels.weighted_sum(problem.X, R[:, None].to(problem.dtype), c.support,
                                             problem.chunk_size), problem.comm, "moves_S1").to(torch.float64)  # fmt: skip
    state = AtomState.from_beta(problem.X, beta[None], problem.bias, problem.dtype, problem.chunk_size, problem.comm)
    for _ in range(MERGE_NEWTON_STEPS):
        state, _ = newton_m_step(
            problem.X, state, W.reshape(1), S1.reshape(1, -1), problem.ridge * float(W), dtype=problem.dtype,
            method=problem.m_step, cg_max_iter=problem.cg_max_iter, cg_rtol=problem.cg_rtol,
            chunk_size=problem.chunk_size, comm=problem.comm,
        )  # fmt: skip
    return state.beta[0]


def _top_token(problem: FitProblem, data: TokenCounts) -> int | None:
    """The position in ``data`` (this rank's rows) of its most frequent token over the whole vocabulary, ties
    broken by id as in one process (:func:`~torch_softmix.starts.frequent_rows`), or ``None`` when another rank
    holds it."""
    ids, _, _ = frequent_rows(problem.X, data, 1, problem.comm, problem.design.lo)
    mine = torch.nonzero(data.support + problem.design.lo == ids[0])
    return int(mine[0]) if mine.numel() else None


def _split(problem: FitProblem, R: Tensor, gen: torch.Generator, how: str) -> tuple[Tensor, Tensor]:
    """Two components ``(alpha (2,), beta (2, L))`` for the data ``R (S,)``, then a short EM on that data alone.

    ``how="kmeans"``: the k-means start of the data's frequent tokens; ``"peak"``: the data's most frequent
    token alone against the rest (each group moment-matched), the start of a near-deterministic law.
    """
    c = problem.counts
    keep = R > 0
    data = TokenCounts(c.support[keep], R[keep], c.vocab_size)
    sub = FitProblem(problem.design, data, problem.dtype, problem.ridge, problem.m_step, 1, problem.cg_max_iter,
                     problem.cg_rtol, problem.tol, n_total=float(kernels.allsum(R.sum().reshape(1), problem.comm,
                                                                                "moves_n")))  # fmt: skip
    d = problem.design
    if how == "peak":
        groups = torch.zeros(data.n_distinct, 2, dtype=torch.float64, device=R.device)
        groups[:, 1] = data.values
        top = _top_token(problem, data)
        if top is not None:  # on the rank that holds it
            groups[top] = torch.stack([data.values[top], data.values.new_zeros(())])
        W = kernels.allsum(groups.sum(0), problem.comm, "moves_W2")
        beta = torch.stack([_merged_atom(sub, torch.zeros_like(d.whitening.mean), groups[:, g], W[g]) for g in (0, 1)])
        alpha = W / W.sum()
    else:
        alpha, beta = kmeans_start(d.X, data, 2, gen, whitening=d.whitening, bias=d.bias, ridge=problem.ridge,
                                   dtype=problem.dtype, chunk_size=d.chunk_size, comm=d.comm, offset=d.lo)  # fmt: skip
    result = run(sub, sub.evaluate(sub.state(alpha, beta)), SPLIT_EM_ITERS)
    return result.state.log_alpha.exp(), result.state.beta


def apply_move(problem: FitProblem, point: Point, move: Move, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The start ``(alpha (K,), beta (K, L))`` after ``move``; the other components keep their atoms and weights."""
    R, _ = shares(problem, point)
    W = kernels.allsum(R.sum(0), problem.comm, "moves_W")
    alpha = point.state.log_alpha.exp().clone()
    beta = point.state.beta.clone()
    i, j = move.merge
    k = move.split
    if k == i:  # re-split the pair's data
        a2, b2 = _split(problem, R[:, i] + R[:, j], gen, move.how)
        total = alpha[i] + alpha[j]
        alpha[i], alpha[j] = total * a2[0], total * a2[1]
        beta[i], beta[j] = b2[0], b2[1]
        return alpha, beta
    w = W[i] + W[j]
    start = (W[i] * beta[i] + W[j] * beta[j]) / w.clamp_min(1e-300)
    merged = _merged_atom(problem, start, R[:, i] + R[:, j], w)
    a2, b2 = _split(problem, R[:, k], gen, move.how)
    # the merged atom takes slot i; slot j and slot k take the split's two atoms
    alpha[i], beta[i] = alpha[i] + alpha[j], merged
    ak = alpha[k].clone()
    alpha[j], alpha[k] = ak * a2[0], ak * a2[1]
    beta[j], beta[k] = b2[0], b2[1]
    return alpha, beta


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
    W, S1, N = R.sum(0), point.stats.S1.to(torch.float64), problem.n_tokens
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
            loglik = float((c.values * torch.logsumexp(cols + alpha.log(), 1)).sum())
            best[kind].append((per_token_objective(loglik, beta, problem.lam, N), alpha, beta))
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
