"""Is the L-BFGS phase slow on LM designs for want of curvature? Exact Newton from EM's hand-over point.

On SmolLM2 cases the default fit hands over from EM to the L-BFGS phase within ~10 EM iterations and L-BFGS
then needs hundreds of iterations. This probe takes one case of ``experiment_lm.py`` (``K = 4``,
``N = 10^6``, seed 4006), runs the default fit without the L-BFGS phase and without moves (``polish_iter=0,
n_moves=0``: EM to its ``max_iter``), and from there takes damped Newton steps on the same penalised marginal
objective with the *exact* Hessian (autograd, float64, ``K L + K`` = 2308 parameters; shifted by 1.5x its
largest eigenvalue where that is positive, i.e. where the objective is not concave; Armijo backtracking).
Printed per step: the objective per token, the step length, the shift, the Hessian's extreme eigenvalues
and the gradient norm. About a minute per step on 2 CPU cores.

    python benchmarks/probe_newton.py > benchmarks/results/probe_newton.txt
"""

import sys
import time
from pathlib import Path

import experiment_lm as E
import torch
from race_lbfgs import RIDGE, objective
from torch.func import grad, jacrev

from torch_softmix.design import Design

K, N, SEED, STEPS = 4, 1_000_000, 4006, 12


def main() -> None:
    X, B = E.load(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/.smollm2_atoms.pt"))
    _, _, counts = E.make_case(X, B, K, N, SEED)
    f, _ = E.fit(Design(X), counts, K, random_state=SEED, polish_iter=0, n_moves=0)
    assert f.ridge == RIDGE  # the fit's objective is the one differentiated below
    print("EM end", f.objective_, f.n_iter_)
    X64, L = X.double(), X.shape[1]

    def F(theta):
        return objective(X64, None, counts, theta[K * L :], theta[: K * L].reshape(K, L))

    theta = torch.cat([f.head_.beta.detach().double().reshape(-1), f.head_.alpha.detach().double().log()])
    print("F start", float(F(theta)))
    g_fn = grad(F)
    for step in range(STEPS):
        t0 = time.perf_counter()
        g = g_fn(theta)
        H = jacrev(g_fn, chunk_size=48)(theta)
        H = 0.5 * (H + H.T)
        ev = torch.linalg.eigvalsh(H)
        mu = float(ev[-1]) * 1.5 + 1e-10 if ev[-1] > -1e-12 else 0.0
        d = torch.linalg.solve(-H + mu * torch.eye(H.shape[0], dtype=H.dtype), g)
        f0, t = float(F(theta)), 1.0
        while float(F(theta + t * d)) < f0 + 1e-4 * t * float(g @ d) and t > 1e-6:
            t *= 0.5
        theta = theta + t * d
        f1, top, low, gn, sec = float(F(theta)), float(ev[-1]), float(ev[0]), float(g.norm()), time.perf_counter() - t0
        print(step, f"F {f1:.9f}  t={t:.3g}  mu={mu:.2g}  max ev {top:.3g} min ev {low:.3g}  |g| {gn:.2e}  ({sec:.1f}s)",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
