"""Would a better *screening* of the moves find the oracle's basin? Every move, continued to the end.

For SmolLM2 cases of ``experiment_lm.py`` (same prompt sets, weights and tokens for a seed) the default fit
and the oracle are run; then, from the default's final point, **every** split-and-merge move that
:func:`torch_softmix.moves.candidate_moves` can list (each pair merged and each component split, or a
pair's data re-split; k-means and peak splits) is built, screened with the fit's
``MOVE_SCREEN_ITERS`` EM iterations, and continued to convergence as the fit continues a finalist (EM
until its rate hands over, then the L-BFGS phase). Recorded per trial: the move's score, its objective
after screening, after 10, 40 and 150 L-BFGS iterations, and at the end.

Printed per case: how many trials end at the oracle's objective (within 1e-6 per token, or above it), and
their ranks among all trials by move score, by screened objective and by objective after 10/40/150 L-BFGS
iterations (rank 0 is the best). If the trials that reach the oracle ranked first by any of these, a
cheaper screening would find them; if they rank anywhere, only continuing many trials would.

    python benchmarks/probe_move_trials.py --K 4 --N 1e6 --seeds 4006 4016 4026

Results are appended to ``benchmarks/results/probe_move_trials.jsonl`` (one line per case). The lines there were
written before the moves' pieces were built once per round (session 20): each trial then built its own split
(a k-means start and 20 EM iterations on its data) and merge (8 Newton steps), with its own random k-means.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import experiment_lm as E
import torch

from torch_softmix import EMFitter
from torch_softmix.design import Design
from torch_softmix.engine import run
from torch_softmix.moves import apply_move, build_pieces, candidate_moves
from torch_softmix.progress import Bars
from torch_softmix.search import MOVE_SCREEN_ITERS, Schedule, polish_phase

AT = (10, 40, 150)  # L-BFGS iterations at which the trials are ranked


def ranks(values: list[float], members: list[int]) -> list[int]:
    """The rank (0 = highest value) of each member."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    return sorted(order.index(i) for i in members)


def probe(X, B, K: int, N: int, seed: int) -> dict:
    _, truth, counts = E.make_case(X, B, K, N, seed)
    design = Design(X)
    design.whitening  # noqa: B018
    oracle, _ = E.fit(design, counts, K, init=truth, random_state=0)
    default, _ = E.fit(design, counts, K, random_state=seed)
    problem, _ = EMFitter(K)._problem(design, None, None, counts)
    head = default.head_
    point = problem.evaluate(problem.state(head.alpha.detach().double(), head.beta.detach().double()))
    moves = candidate_moves(problem, point)  # every move, best score first
    gen = torch.Generator().manual_seed(seed + 1)
    pieces = build_pieces(problem, point, moves, gen)  # every split and merge, built once
    sched = Schedule(300, polish_iter=1000, switch_rate=0.3)
    trials = []
    t0 = time.perf_counter()
    with Bars(False, "") as bars:
        for m in moves:
            alpha, beta = apply_move(point, m, pieces)
            screened = run(problem, problem.evaluate(problem.state(alpha, beta)), MOVE_SCREEN_ITERS)
            em = run(problem, screened.point, 300, history=screened.history, n_done=screened.n_iter,
                     switch_rate=sched.switch_rate)  # fmt: skip
            trace: list[float] = []
            end, _ = polish_phase(problem, em, sched, bars, lambda ev, trace=trace: trace.append(ev.objective))
            at = [trace[min(i, len(trace)) - 1] if trace else em.point.objective for i in AT]
            trials.append({"merge": m.merge, "split": m.split, "how": m.how, "score": m.score,
                           "screened": screened.point.objective, "at": at, "final": end.point.objective})  # fmt: skip
    target = oracle.objective_ - 1e-6
    hits = [i for i, t in enumerate(trials) if t["final"] >= target]
    row = {
        "K": K, "N": N, "seed": seed, "oracle": oracle.objective_, "default": default.objective_,
        "default_gap": oracle.objective_ - default.objective_, "n_trials": len(trials), "n_hits": len(hits),
        "best_trial_gap": oracle.objective_ - max(t["final"] for t in trials),
        "rank_by_score": ranks([t["score"] for t in trials], hits),
        "rank_by_screened": ranks([t["screened"] for t in trials], hits),
        **{f"rank_after_{a}": ranks([t["at"][j] for t in trials], hits) for j, a in enumerate(AT)},
        "hits": [trials[i] for i in hits], "seconds": time.perf_counter() - t0, "trials": trials,
    }  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--N", type=float, default=1e6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[4006, 4016, 4026])
    ap.add_argument("--cache", type=Path, default=Path("benchmarks/results/.smollm2_atoms.pt"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/probe_move_trials.jsonl"))
    args = ap.parse_args()
    X, B = E.load(args.cache)
    for seed in args.seeds:
        row = probe(X, B, args.K, int(args.N), seed)
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"K={row['K']} N={row['N']:.0e} seed={seed}: default gap {row['default_gap']:+.2e}; {row['n_hits']} of "
              f"{row['n_trials']} trials reach the oracle (best trial gap {row['best_trial_gap']:+.2e}); their ranks "
              f"by move score {row['rank_by_score']}, screened {row['rank_by_screened']}, after 10/40/150 L-BFGS "
              f"iterations {row['rank_after_10']} / {row['rank_after_40']} / {row['rank_after_150']}; "
              f"{row['seconds']:.0f} s of trials", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
