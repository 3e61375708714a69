"""Where do the default fit's continued move trials go? Their L-BFGS runs traced against the current fit.

For SmolLM2 cases of ``experiment_lm.py`` (same prompt sets, weights and tokens for a seed) the default fit runs
as it is; every continued trial's L-BFGS phase is traced every :data:`EVERY` iterations: its per-token objective
minus the current fit's (the one the trial must beat) and the total variation between the two fits'
responsibilities (counts shared out by component, components matched to minimise it; 0: the same partition of the
data, 1: disjoint). Instrumentation only: ``search.polish_phase`` is wrapped in this process (the fit passes no
callback to its trials), and the traces cost a pass over ``X`` each.

The question: how much of a fit's time goes to trials that return to the basin of the fit they started from
(their total variation falls to 0 and their objective to the current one's, so they cannot be kept), and how
early a trace tells them from trials that end in another basin.

    python benchmarks/probe_trial_basins.py --K 2 --N 1e5 --seeds 2005 2015 2025

Results are appended to ``benchmarks/results/probe_trial_basins.jsonl`` (one line per case).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import experiment_lm as E
import torch
from scipy.optimize import linear_sum_assignment

from torch_softmix import em as em_module
from torch_softmix import search
from torch_softmix.design import Design
from torch_softmix.moves import shares

EVERY = 5  # L-BFGS iterations between two points of a trace
OUT = Path(__file__).parent / "results" / "probe_trial_basins.jsonl"


def total_variation(R1: torch.Tensor, R2: torch.Tensor) -> float:
    """Half the L1 distance between two responsibilities ``(S, K)`` (counts shared out), per token, with the
    components of ``R2`` matched to ``R1``'s to minimise it."""
    C = (R1[:, :, None] - R2[:, None, :]).abs().sum(0)
    rows, cols = linear_sum_assignment(C.numpy())
    return float(C[rows, cols].sum()) / (2 * float(R1.sum()))


def traced_case(X, B, K: int, N: int, seed: int) -> dict:
    _, truth, counts = E.make_case(X, B, K, N, seed)
    design = Design(X)
    design.whitening  # noqa: B018
    fits: dict[float, tuple[float, torch.Tensor]] = {}  # what a trial must beat -> (that fit's objective, its R)
    trials: list[dict] = []
    original = search.polish_phase

    def traced(problem, result, sched, bars, user=None, start="", target=None):
        trace, t0 = [], time.perf_counter()
        if target is not None:  # a trial: the fit it must beat (every fit of the search came out of this phase)
            current, R_current = fits[target]

            def user(ev):  # noqa: F811  (trials get no callback from the fit)
                if ev.phase == "polish" and ev.n_iter % EVERY == 0:
                    point = problem.evaluate(problem.state(ev.log_alpha.exp().double(), ev.beta.double()))
                    trace.append((ev.n_iter, ev.objective - current, total_variation(shares(problem, point)[0],
                                                                                     R_current)))  # fmt: skip

        out, done = original(problem, result, sched, bars, user, start, target)
        if target is not None:
            trials.append({"gain": out.point.objective - current, "gave_up": bool(done["gave_up"]),
                           "n_iter": int(done["n_iter"]), "seconds": time.perf_counter() - t0,
                           "tv_end": total_variation(shares(problem, out.point)[0], R_current),
                           "trace": trace})  # fmt: skip
        fits[search._to_beat(problem, out)] = (out.point.objective, shares(problem, out.point)[0])
        return out, done

    search.polish_phase = em_module.polish_phase = traced
    try:
        f, t = E.fit(design, counts, K, random_state=seed)
    finally:
        search.polish_phase = em_module.polish_phase = original
    return {"K": K, "N": N, "seed": seed, "objective": f.objective_, "time": t, "moves": f.moves_, "trials": trials}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--N", type=float, default=1e5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[2005, 2015, 2025])
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / "results" / ".smollm2_atoms.pt")
    args = ap.parse_args()
    X, B = E.load(args.cache)
    for seed in args.seeds:
        row = traced_case(X, B, args.K, int(args.N), seed)
        with OUT.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"seed {seed}: fit {row['time']:.0f} s, of which trials {sum(t['seconds'] for t in row['trials']):.0f} s")
        for t in row["trials"]:
            back = next((i for i, _, tv in t["trace"] if tv < 1e-3), None)
            print(f"  gain {t['gain']:+.1e}  total variation at the end {t['tv_end']:.4f}  {t['n_iter']} iterations"
                  f"{' (gave up)' if t['gave_up'] else ''}  below 1e-3 from iteration {back}  {t['seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
