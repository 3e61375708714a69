"""EM at vocabulary scale: time per pass over X, peak memory, and scaling in p, L, K and N.

All numbers are ratios measured side by side in one run (one subprocess per design, so that peak
memory is that design's alone):

* per design (p, L, K) in {(49152, 576, 8), (262144, 640, 16), (128256, 4096, 8)}, float32:
  passes over X per EM iteration, time per pass against one plain ``X @ beta^T`` of the same shape,
  the whole iteration against its E-step plus one gradient pass (the least an iteration can do), and
  peak RSS against the bound 1.5 x (embedding + K L floats + one chunk, + the K L x L float64 factors of the
  M-step's block preconditioner when it is used: small designs, torch_softmix.curvature.usable) for Newton-CG;
* iteration time as p, L and K double from (16384, 128, 4);
* fit time (10 EM iterations) as N grows 10^4 -> 10^9 tokens on (49152, 576, 4): flat once counted.

    python benchmarks/bench_scale.py [--quick] [--json benchmarks/results/bench_scale.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from common import best_of  # benchmarks/common.py (the script's folder is on sys.path)

DESIGNS = [(49152, 576, 8), (262144, 640, 16), (128256, 4096, 8)]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(p: int, L: int, K: int, N: int, iters: int) -> dict:
    """One design: build it, count N tokens, time EM iterations and the plain products; peak RSS."""
    from torch_softmix import Design, EMFitter, curvature, kernels
    from torch_softmix import simulate as sim
    from torch_softmix.mstep import AtomState

    # the baseline includes the libraries' lazy initialisation (BLAS / OpenMP workspaces), not the design
    warm = torch.randn(2048, 512)
    (warm @ warm.T).sum()
    sim.sample_counts(sim.make_head(warm[:512, :64].double(), sim.random_mixture(2, 64, seed=0)), 1000, seed=0)
    del warm
    base = rss_mb()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(p, L, generator=gen).div_(L**0.5)  # float32 (in place: no second copy), unit-scale logits
    emb_mb = X.numel() * 4 / 2**20
    truth = sim.random_mixture(K, L, norm=3.0 * L**0.5, min_weight=0.5 / K, seed=1)
    head = sim.make_head(X, truth)
    counts = sim.sample_counts(head, N, seed=2)
    del head
    start = sim.perturbed_start(truth, 0.3, seed=3)
    B = start["beta"].float()

    t_matmul = best_of(lambda: X @ B.T, repeat=3)
    fitter = EMFitter(K, init=start, max_iter=iters, tol=0, accelerate=None, polish_iter=0, n_moves=0, n_transfers=0)  # EM iterations only
    t0 = time.perf_counter()
    fitter.fit(X, counts=counts)
    t_fit = time.perf_counter() - t0
    hist = fitter.history_
    t_iter = (hist[-1]["time"] - hist[1]["time"]) / max(1, len(hist) - 2)  # steady-state iterations
    passes = float(np.mean([h["passes"] for h in hist[1:]])) + 1  # M-step passes + the E-step's support pass
    # the least an iteration can do: the E-step on the support plus one gradient pass m = s^T X
    c = torch.nonzero(counts).flatten()
    st = AtomState.from_beta(X, B.double(), None, torch.float32)
    la = torch.log(start["alpha"])
    n = counts[c].double()
    t_least = best_of(
        lambda: (
            kernels.e_step_from_logits(X, st.logits[c], la, st.A, c, n, torch.float32),
            kernels.weighted_sum(X, kernels.probs_from_logits(st.logits, st.A, torch.float32)),
        ),
        repeat=3,
    )
    peak = rss_mb() - base
    chunk_mb = kernels.CHUNK_ELEMENTS * 4 / 2**20
    blocks_mb = K * L * L * 8 / 2**20 if curvature.usable(Design(X, validate=False), K) else 0.0
    bound = 1.5 * (emb_mb + K * L * 8 / 2**20 + blocks_mb + chunk_mb)
    return {
        "p": p,
        "L": L,
        "K": K,
        "N": N,
        "m_step": fitter.m_step_,
        "t_matmul": t_matmul,
        "t_iter": t_iter,
        "passes": passes,
        "t_per_pass": t_iter / passes,
        "pass_vs_matmul": t_iter / passes / t_matmul,
        "t_least": t_least,
        "iter_vs_least": t_iter / t_least,
        "t_fit": t_fit,
        "embedding_mb": emb_mb,
        "peak_rss_mb": peak,
        "bound_mb": bound,
        "blocks": blocks_mb > 0,
        "n_distinct": int(c.numel()),
    }


def run_worker(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=5, type=int, metavar=("P", "L", "K", "N", "ITERS"))
    ap.add_argument("--quick", action="store_true", help="skip the two largest designs and N = 1e9")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"{platform.processor() or ''}"
    )
    results: dict = {"designs": [], "scaling": [], "tokens": []}
    designs = DESIGNS[:1] if args.quick else DESIGNS
    print("\nper design (float32, N = 1e6, start = truth + 30% noise, m_step='auto', one EM iteration):")
    print(
        f"{'p':>7}{'L':>6}{'K':>4} {'m_step':<17}{'passes':>7}{'s/pass':>9}{'pass/matmul':>12}"
        f"{'s/iter':>8}{'iter/least':>11}{'peak MB':>9}{'bound MB':>9}"
    )
    for p, L, K in designs:
        r = run_worker([str(p), str(L), str(K), str(10**6), "3"])
        results["designs"].append(r)
        print(
            f"{p:>7}{L:>6}{K:>4} {r['m_step'] + ('+blocks' if r['blocks'] else ''):<17}{r['passes']:>7.0f}{r['t_per_pass']:>9.4f}"
            f"{r['pass_vs_matmul']:>12.2f}{r['t_iter']:>8.2f}{r['iter_vs_least']:>11.1f}"
            f"{r['peak_rss_mb']:>9.0f}{r['bound_mb']:>9.0f}"
        )
    print("\nscaling of one EM iteration from (16384, 128, 4), N = 1e6:")
    base = (16384, 128, 4)
    rows = [("base", base), ("2p", (32768, 128, 4)), ("2L", (16384, 256, 4)), ("2K", (16384, 128, 8))]
    t_base = None
    for name, (p, L, K) in rows:
        r = run_worker([str(p), str(L), str(K), str(10**6), "4"])
        t_base = t_base or r["t_iter"]
        results["scaling"].append({"name": name, **r})
        print(f"  {name:<5} p={p:<6} L={L:<4} K={K:<2} {r['t_iter']:.4f} s/iter  x{r['t_iter'] / t_base:.2f}")
    print("\nfit time (10 EM iterations) as N grows, (49152, 576, 4):")
    Ns = [10**4, 10**6, 10**8] + ([] if args.quick else [10**9])
    t_first = None
    for N in Ns:
        r = run_worker(["49152", "576", "4", str(N), "10"])
        t_first = t_first or r["t_fit"]
        results["tokens"].append(r)
        print(
            f"  N = {N:.0e}: {r['n_distinct']:>6} distinct tokens, fit {r['t_fit']:.2f} s  x{r['t_fit'] / t_first:.2f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
