"""The E-step with the next M-step's softmax means in one pass (``kernels.e_step_with_mean``) against the two
separate products, side by side in one process on the race's Gaussian near/far problems.

For each problem the default ``EMFitter`` runs twice from the same start, with the fused pass (the default
where the counts cover half of the rows and ``L >= kernels.FUSE_MIN_WIDTH``; here forced at every ``L``) and
without it (``kernels.FUSE_MIN_SUPPORT`` set out of reach), in
alternating order; ``race_lbfgs.score`` (one float64 objective) gives both runs' time to the common target
(the better end minus 1e-7 per token). Printed: passes over ``X`` per EM map, time per EM map, and the
ratios separate / fused.

    python benchmarks/bench_fused_estep.py [--L 64 192 576] [--K 2 5 8] [--device cuda] [--out benchmarks/results/fused_estep.txt]

On a GPU the clock waits for the device at each time stamp (``race_lbfgs.Recorder``), and both variants run
once on a small problem first, so that first-call costs stay out of the first row.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import race_lbfgs as race  # noqa: E402

from torch_softmix import EMFitter, kernels  # noqa: E402
from torch_softmix.design import Design  # noqa: E402


def fit(X, bias, counts, start, K: int, fused: bool):
    kernels.FUSE_MIN_SUPPORT = 0.5 if fused else math.inf
    kernels.FUSE_MIN_WIDTH = 0  # fused or not at every width: the bench measures where the default's rule should lie
    kernels.PASSES[0] = 0.0
    rec = race.Recorder()
    rec(torch.log(start["alpha"]), start["beta"])
    em = {"passes": 0.0, "maps": 0, "time": 0.0}

    def on_event(ev):
        rec(ev.log_alpha, ev.beta)
        if ev.phase == "em":
            em.update(passes=kernels.PASSES[0], maps=ev.n_iter, time=rec.points[-1][0])

    fitter = EMFitter(K, init=start, random_state=0)
    fitter.fit(Design(X, bias), counts=counts, callback=on_event)
    rec(fitter.head_.log_alpha, fitter.head_.beta)
    return rec, em


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, nargs="+", default=[64, 192, 576])
    ap.add_argument("--K", type=int, nargs="+", default=[2, 5, 8])
    ap.add_argument("--p", type=int, default=32768)
    ap.add_argument("--N", type=int, default=10**6)
    ap.add_argument("--device", default="cpu", help="where both variants run (cpu or cuda)")
    ap.add_argument("--out", type=Path, default=race.RESULTS / "fused_estep.txt")
    args = ap.parse_args()
    dev = torch.device(args.device)
    default = kernels.FUSE_MIN_SUPPORT, kernels.FUSE_MIN_WIDTH
    X, bias, counts, _, start = race.gaussian_problem(16, 2, "near", 0, 4096, 10_000)
    for fused in (True, False):  # warm-up: first calls stay out of the clock
        fit(X.to(dev), bias, counts.to(dev), {k: v.to(dev) for k, v in start.items()}, 2, fused)
    lines, rows = [], []
    cases = [(L, K, kind) for L in args.L for K in args.K for kind in ("near", "far")]
    for i, (L, K, kind) in enumerate(cases):
        X, bias, counts, _, start = race.gaussian_problem(L, K, kind, seed=100 + i, p=args.p, N=args.N)
        X, counts, start = X.to(dev), counts.to(dev), {k: v.to(dev) for k, v in start.items()}
        runs = {}
        for fused in (True, False) if i % 2 == 0 else (False, True):
            runs[fused] = fit(X, bias, counts, start, K, fused)
        kernels.FUSE_MIN_SUPPORT, kernels.FUSE_MIN_WIDTH = default
        sc = race.score(X, bias, counts, {name: (runs[f][0], {}) for name, f in (("fused", True), ("apart", False))})
        row = {"problem": f"L={L} K={K} {kind}", "device": str(dev), "support": counts.n_distinct / args.p,
               "time": (sc["apart"]["time"], sc["fused"]["time"]),
               "passes": tuple(runs[f][1]["passes"] for f in (False, True)),
               "maps": tuple(runs[f][1]["maps"] for f in (False, True)),
               "em_time": tuple(runs[f][1]["time"] for f in (False, True))}  # fmt: skip
        rows.append(row)
        line = (f"{row['problem']:<18} support {row['support']:.2f}  passes/map {row['passes'][0] / row['maps'][0]:.2f} "
                f"-> {row['passes'][1] / row['maps'][1]:.2f}  s/map {row['em_time'][0] / row['maps'][0]:.4f} -> "
                f"{row['em_time'][1] / row['maps'][1]:.4f}  time to target {row['time'][0]:.3f} -> {row['time'][1]:.3f} s")
        print(line, flush=True)
        lines.append(line)
    ok = [r for r in rows if all(math.isfinite(t) for t in r["time"])]
    ratios = [r["time"][0] / r["time"][1] for r in ok]
    per_map = [(r["em_time"][0] / r["maps"][0]) / (r["em_time"][1] / r["maps"][1]) for r in rows]
    ppm = [sum(r["passes"][j] for r in rows) / sum(r["maps"][j] for r in rows) for j in (0, 1)]
    summary = (f"{len(rows)} problems: passes per EM map {ppm[0]:.2f} (separate) -> {ppm[1]:.2f} (fused); "
               f"separate / fused: time per EM map median {statistics.median(per_map):.2f} "
               f"(min {min(per_map):.2f}, max {max(per_map):.2f}), time to target median {statistics.median(ratios):.2f} "
               f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {len(ok)} problems reached by both)")
    print(summary)
    args.out.write_text("\n".join(lines + [summary]) + "\n")


if __name__ == "__main__":
    main()
