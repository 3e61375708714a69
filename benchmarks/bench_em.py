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

import numpy as np
import torch
from common import best_of  # benchmarks/common.py (the script's folder is on sys.path)

from torch_softmix import EMFitter
from torch_softmix import simulate as sim


def marginal_nll(X: torch.Tensor, n: torch.Tensor, log_alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``-sum_j n_j log pi_j / N`` written as a PyTorch user would, differentiable."""
    comp = torch.log_softmax(X @ beta.T, dim=0)  # (p, K)
    log_pi = torch.logsumexp(torch.log_softmax(log_alpha, 0) + comp, dim=1)
    return -(n * log_pi.double()).sum() / n.sum()


def penalised_objective64(
    X64: torch.Tensor, n: torch.Tensor, log_alpha: torch.Tensor, beta: torch.Tensor, ridge: float
) -> float:
    """The per-token objective evaluated in float64, the one yardstick for every method."""
    with torch.no_grad():
        b = beta.detach().double()
        return float(-marginal_nll(X64, n, log_alpha.detach().double(), b) - 0.5 * ridge * (b**2).sum())


def run_lbfgs(X, X64, counts, start, ridge: float, dtype: torch.dtype, max_seconds: float, max_outer: int = 400):
    """L-BFGS (strong Wolfe) on the same penalised objective, in ``dtype``; trace of (seconds, float64 objective).

    Time spent evaluating the float64 yardstick is excluded from the clock.
    """
    n = counts.double()
    Xd = X if dtype == X.dtype else X.to(dtype)
    la = torch.log(start["alpha"]).to(dtype).clone().requires_grad_(True)
    beta = start["beta"].to(dtype).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [la, beta],
        lr=1,
        max_iter=5,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
    )

    def closure():
        opt.zero_grad()
        loss = marginal_nll(Xd, n, la, beta) + 0.5 * ridge * (beta.double() ** 2).sum()
        loss.backward()
        return loss

    trace = [(0.0, penalised_objective64(X64, n, la, beta, ridge))]
    clock = 0.0
    for _ in range(max_outer):
        t0 = time.perf_counter()
        opt.step(closure)
        clock += time.perf_counter() - t0
        trace.append((clock, penalised_objective64(X64, n, la, beta, ridge)))
        if abs(trace[-1][1] - trace[-2][1]) < 1e-12 or clock > max_seconds:
            break
    return trace


def run_adam(X, X64, counts, start, ridge: float, lr: float, max_seconds: float, steps: int = 3000, every: int = 25):
    """Adam (float32) on the same penalised objective; trace of (seconds, float64 objective) every ``every`` steps."""
    n = counts.double()
    la = torch.log(start["alpha"]).float().clone().requires_grad_(True)
    beta = start["beta"].float().clone().requires_grad_(True)
    opt = torch.optim.Adam([la, beta], lr=lr)
    trace = [(0.0, penalised_objective64(X64, n, la, beta, ridge))]
    clock = 0.0
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = marginal_nll(X, n, la, beta) + 0.5 * ridge * (beta.double() ** 2).sum()
        loss.backward()
        opt.step()
        clock += time.perf_counter() - t0
        if i % every == 0:
            trace.append((clock, penalised_objective64(X64, n, la, beta, ridge)))
            if clock > max_seconds:
                break
    return trace


def time_to(trace, target: float) -> float | None:
    """First time at which a (seconds, objective) trace reaches ``target``."""
    return next((t for t, obj in trace if obj >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, default=49152)
    ap.add_argument("--L", type=int, default=576)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--N", type=int, default=10**6)
    ap.add_argument("--m-step", default="auto")
    ap.add_argument("--accelerate", default="squarem", help="squarem or none")
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
    start = sim.perturbed_start(truth, args.noise, seed=args.seed + 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"design {p} x {L} float32, K = {K}, N = {args.N:,} ({int((counts > 0).sum()):,} distinct tokens)")

    # unavoidable work: X @ beta^T and X^T @ weights
    B = start["beta"].float()
    Wt = torch.rand(p, K)  # (p, K) weights; (K, p) @ (p, L) is the layout autograd uses
    t_fwd = best_of(lambda: X @ B.T)
    t_bwd = best_of(lambda: Wt.T @ X)
    t_min = t_fwd + t_bwd

    # EM
    X64 = X.double()
    n = counts.double()
    fitter = EMFitter(
        K,
        init=start,
        m_step=args.m_step,
        max_iter=args.em_iters,
        tol=1e-10,
        ridge=args.ridge,
        accelerate=None if args.accelerate == "none" else args.accelerate,
    )
    t0 = time.perf_counter()
    head = fitter.fit(X, counts=counts)
    t_em = time.perf_counter() - t0
    hist = fitter.history_
    em_trace = [(h["time"], h["objective"]) for h in hist]
    t_iter = hist[-1]["time"] / max(1, fitter.n_iter_)
    em_final64 = penalised_objective64(X64, n, head.log_alpha, head.beta, args.ridge)
    # the same EM without acceleration, side by side (is SQUAREM worth its default?)
    plain = EMFitter(
        K, init=start, m_step=args.m_step, max_iter=args.em_iters, tol=1e-10, ridge=args.ridge, accelerate=None
    )
    t0 = time.perf_counter()
    plain.fit(X, counts=counts)
    t_plain = time.perf_counter() - t0
    plain_trace = [(h["time"], h["objective"]) for h in plain.history_]

    # L-BFGS on the marginal likelihood, float32 and float64; Adam
    traces = {
        dt_name: run_lbfgs(X, X64, counts, start, args.ridge, dt, args.max_seconds)
        for dt_name, dt in (("float32", torch.float32), ("float64", torch.float64))
    }
    # Adam (float32), the best of three learning rates
    adam = {lr: run_adam(X, X64, counts, start, args.ridge, lr, args.max_seconds / 3) for lr in (0.01, 0.05, 0.2)}
    best_lr = max(adam, key=lambda lr: max(o for _, o in adam[lr]))
    traces[f"Adam lr={best_lr}"] = adam[best_lr]

    passes = np.mean([h.get("passes", 0) for h in hist[1:]]) if len(hist) > 1 else 0
    rows = [
        ("X @ beta^T", t_fwd, None),
        ("weights^T @ X", t_bwd, None),
        ("unavoidable work (sum)", t_min, 1.0),
        (f"one EM iteration (m_step={fitter.m_step_})", t_iter, t_iter / t_min),
    ]
    print(f"\n{'what':<44}{'seconds':>10}{'ratio':>10}")
    for name, sec, ratio in rows:
        print(f"{name:<44}{sec:>10.4f}{'' if ratio is None else f'{ratio:>10.1f}'}")
    print(f"passes over X per M-step: {passes:.0f} (each one product of p x L x K)")
    print(f"\nobjective = loglik/token - ridge/2 sum ||beta_k||^2 (ridge = {args.ridge:g}), evaluated in float64")
    print(f"EM ({args.accelerate}): {fitter.n_iter_} iterations, {t_em:.2f} s, objective {em_final64:.9f}")
    print(f"EM (no acceleration): {plain.n_iter_} iterations, {t_plain:.2f} s, objective {plain.objective_:.9f}")
    finals = {"EM": em_final64}
    for name, tr in traces.items():
        label = name if name.startswith("Adam") else f"L-BFGS {name}"
        finals[label] = max(o for _, o in tr)
        print(f"{label}: {tr[-1][0]:.2f} s, best objective {finals[label]:.9f}")
    target = min(v for k, v in finals.items() if not k.startswith("Adam")) - 1e-7  # the level EM and L-BFGS reach
    reach = {"EM": time_to(em_trace, target), "EM without SQUAREM": time_to(plain_trace, target)}
    reach.update({(k if k.startswith("Adam") else f"L-BFGS {k}"): time_to(tr, target) for k, tr in traces.items()})
    print(f"\ntime to reach objective {target:.9f} (the worse of the EM and L-BFGS finals, less 1e-7):")
    for name, sec in reach.items():
        shown = "not reached" if sec is None else f"{sec:8.2f} s   ratio to EM {sec / reach['EM']:.2f}"
        print(f"  {name:<18}{shown}")
    others = [v for k, v in reach.items() if not k.startswith("EM") and v is not None]
    if others:
        print(f"speed-up of EM over the best baseline that reaches it: {min(others) / reach['EM']:.2f}x")
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
                    "plain_iters": plain.n_iter_,
                    "t_plain": t_plain,
                    "finals": finals,
                    "target": target,
                    "time_to_target": reach,
                    "passes_per_mstep": float(passes),
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
