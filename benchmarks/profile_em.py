"""Where the time of an EM fit goes: cProfile of 10 EM iterations on a SmolLM2-sized design.

    python benchmarks/profile_em.py [--p 49152] [--L 576] [--K 8]

Prints the functions of torch_softmix sorted by cumulative time, as shares of the fit.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

from torch_softmix import EMFitter
from torch_softmix import simulate as sim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, default=49152)
    ap.add_argument("--L", type=int, default=576)
    ap.add_argument("--K", type=int, default=8)
    args = ap.parse_args()
    p, L, K = args.p, args.L, args.K
    X = sim.gaussian_design(p, L, seed=0).div_(L**0.5)
    truth = sim.random_mixture(K, L, norm=3.0 * L**0.5, min_weight=0.5 / K, seed=1)
    counts = sim.sample_counts(sim.make_head(X, truth), 10**6, seed=2)
    start = {"alpha": truth["alpha"], "beta": truth["beta"] * 1.1}
    fitter = EMFitter(K, init=start, max_iter=10, tol=0)
    prof = cProfile.Profile()
    prof.enable()
    fitter.fit(X, counts=counts)
    prof.disable()
    stats = pstats.Stats(prof)
    total = max(v[3] for k, v in stats.stats.items() if k[2] == "fit")
    rows = [(k, v) for k, v in stats.stats.items() if "torch_softmix" in k[0]]
    rows.sort(key=lambda kv: -kv[1][3])
    print(f"10 EM iterations on ({p}, {L}, {K}): {total:.2f} s")
    print(f"{'function':<48}{'calls':>7}{'cum s':>8}{'share':>8}")
    for (path, _, name), (_, nc, _, ct, _) in rows[:14]:
        mod = path.split("torch_softmix/")[-1]
        print(f"{mod + ':' + name:<48}{nc:>7}{ct:>8.2f}{ct / total:>8.0%}")


if __name__ == "__main__":
    main()
