"""Cost of one EM iteration against the unavoidable work, and time-to-likelihood against L-BFGS.

On a Gaussian design of SmolLM2's size (p = 49152, L = 576; float32), K = 8, N = 10^6 tokens,
from one start (the truth with noise added), all measured side by side in one run:

1. one EM iteration (E-step + M-step), averaged over the run;
2. the unavoidable work of an iteration: ``X @ beta^T`` and ``X^T @ weights`` (two matrix
   products of shape p x L x K), the least any method that reads the whole design must do;
3. the per-token log-likelihood reached by ``torch.optim.LBFGS`` (strong Wolfe line search) on
   the marginal log-likelihood from the counts, and the time EM needs to reach it.

    python benchmarks/bench_em.py [--p 49152] [--L 576] [--K 8] [--N 1000000] [--m-step newton]

Prints a table of times and ratios; ``--json PATH`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from torch_softmix import EMFitter
from torch_softmix import simulate as sim


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def marginal_nll(X: torch.Tensor, n: torch.Tensor, log_alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``-sum_j n_j log pi_j / N`` written as a PyTorch user would, differentiable."""
    comp = torch.log_softmax(X @ beta.T, dim=0)  # (p, K)
    log_pi = torch.logsumexp(torch.log_softmax(log_alpha, 0) + comp, dim=1)
    return -(n * log_pi.double()).sum() / n.sum()


def run_lbfgs(X, counts, start, ridge: float, max_seconds: float, max_iter: int = 2000):
    """L-BFGS on the same penalised objective as EM: ``loglik / N - (ridge / 2) sum ||beta_k||^2``."""
    n = counts.double()
    la = torch.log(start["alpha"]).float().clone().requires_grad_(True)
    beta = start["beta"].float().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [la, beta],
        lr=1,
        max_iter=20,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
    )

    def closure():
        opt.zero_grad()
        loss = marginal_nll(X, n, la, beta) + 0.5 * ridge * (beta.double() ** 2).sum()
        loss.backward()
        return loss

    trace = []
    t0 = time.perf_counter()
    prev = float("inf")
    for _ in range(max_iter // 20):
        opt.step(closure)
        with torch.no_grad():
            cur = float(marginal_nll(X, n, la, beta) + 0.5 * ridge * (beta.double() ** 2).sum())
        trace.append((time.perf_counter() - t0, -cur))
        if prev - cur < 1e-12 or time.perf_counter() - t0 > max_seconds:
            break
        prev = cur
    return trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, default=49152)
    ap.add_argument("--L", type=int, default=576)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--N", type=int, default=10**6)
    ap.add_argument("--m-step", default="newton")
    ap.add_argument("--em-iters", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--noise", type=float, default=0.3, help="start = truth + noise * ||beta|| * random unit")
    ap.add_argument("--ridge", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    p, L, K = args.p, args.L, args.K

    X = sim.gaussian_design(p, L, seed=args.seed) / L**0.5  # unit-scale logits
    truth = sim.random_mixture(K, L, norm=3.0 * L**0.5, min_weight=0.5 / K, seed=args.seed + 1)
    true_head = sim.make_head(X, truth)
    counts = sim.sample_counts(true_head, args.N, seed=args.seed + 2)
    g = torch.Generator().manual_seed(args.seed + 3)
    noise = torch.randn(K, L, generator=g, dtype=torch.float64)
    noise = noise / noise.norm(dim=1, keepdim=True) * truth["beta"].norm(dim=1, keepdim=True)
    start = {"alpha": torch.full((K,), 1.0 / K, dtype=torch.float64), "beta": truth["beta"] + args.noise * noise}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"design {p} x {L} float32, K = {K}, N = {args.N:,} ({int((counts > 0).sum()):,} distinct tokens)")

    # unavoidable work: X @ beta^T and X^T @ weights
    B = start["beta"].float()
    Wt = torch.rand(p, K)  # (p, K) weights; (K, p) @ (p, L) is the layout autograd uses
    t_fwd = best_of(lambda: X @ B.T)
    t_bwd = best_of(lambda: Wt.T @ X)
    t_min = t_fwd + t_bwd

    # EM
    fitter = EMFitter(K, init=start, m_step=args.m_step, max_iter=args.em_iters, tol=1e-10, ridge=args.ridge)
    t0 = time.perf_counter()
    fitter.fit(X, counts=counts)
    t_em = time.perf_counter() - t0
    hist = fitter.history_
    t_iter = hist[-1]["time"] / max(1, len(hist) - 1)

    # L-BFGS on the marginal likelihood
    trace = run_lbfgs(X, counts, start, args.ridge, args.max_seconds)
    t_lbfgs, ll_lbfgs = trace[-1]
    target = ll_lbfgs
    reach = next((h["time"] for h in hist if h["objective"] >= target - 1e-7), None)

    rows = [
        ("X @ beta^T", t_fwd, None),
        ("X^T @ weights", t_bwd, None),
        ("unavoidable work (sum)", t_min, 1.0),
        (f"one EM iteration ({args.m_step})", t_iter, t_iter / t_min),
    ]
    print(f"\n{'what':<34}{'seconds':>10}{'ratio':>10}")
    for name, sec, ratio in rows:
        print(f"{name:<34}{sec:>10.4f}{'' if ratio is None else f'{ratio:>10.1f}'}")
    print(f"\nobjective = loglik/token - ridge/2 sum ||beta_k||^2, ridge = {args.ridge:g}")
    print(f"EM: {fitter.n_iter_} iterations, {t_em:.2f} s, objective {fitter.objective_:.8f}")
    print(f"L-BFGS: {len(trace)} x 20 iterations max, {t_lbfgs:.2f} s, objective {ll_lbfgs:.8f}")
    if reach is None:
        print(f"EM did not reach L-BFGS's objective (within 1e-7) in {t_em:.2f} s")
    else:
        print(
            f"time to L-BFGS's objective (within 1e-7): EM {reach:.2f} s vs L-BFGS {t_lbfgs:.2f} s, "
            f"ratio EM / L-BFGS = {reach / t_lbfgs:.2f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "args": vars(args),
                    "t_fwd": t_fwd,
                    "t_bwd": t_bwd,
                    "t_iter": t_iter,
                    "t_em": t_em,
                    "em_iters": fitter.n_iter_,
                    "em_objective": fitter.objective_,
                    "t_lbfgs": t_lbfgs,
                    "lbfgs_objective": ll_lbfgs,
                    "em_time_to_lbfgs": reach,
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
