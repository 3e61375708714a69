"""The SmolLM2 demo behind ``softmix demo``: a next-token mixture whose truth is known, fitted and compared.

Four prompts with weights 0.4/0.3/0.2/0.1 make a next-token law that is exactly a softmax mixture whose
atoms are the prompts' final hidden states (:mod:`torch_softmix.hf`). :func:`run_demo` samples from it,
fits from the default start for language models, runs the oracle (the same fit started at the truth)
and returns the numbers; :func:`print_demo` prints them as a table.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import simulate as sim
from .em import EMFitter

DEMO_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n    ",
    "My favourite food is",
]
DEMO_WEIGHTS = [0.4, 0.3, 0.2, 0.1]


def run_demo(
    n_tokens: int = 10**6, n_heldout: int = 10**6, seed: int = 0, progress: bool = True, **fit_kwargs: Any
) -> dict:
    """The SmolLM2 demo: K = 4 prompts with unequal weights, next tokens sampled, fit with :class:`EMFitter`'s
    defaults, and a comparison with the truth and with the oracle (the same fit started at the true atoms).
    ``fit_kwargs`` (e.g. ``n_moves=0``) go to both fitters. Returns the numbers."""
    from . import hf

    t_start = time.perf_counter()
    model, tok = hf.load_smollm2()
    design = hf.output_design(model)
    t_load = time.perf_counter() - t_start
    sample = hf.sample_next_tokens(
        model, tok, DEMO_PROMPTS, n_tokens, weights=DEMO_WEIGHTS, seed=seed, progress=progress
    )
    heldout = hf.sample_next_tokens(model, tok, DEMO_PROMPTS, n_heldout, weights=DEMO_WEIGHTS, seed=seed + 1)
    true_head = sample.true_head(design)
    K, L = len(DEMO_PROMPTS), design.X.shape[1]
    t0 = time.perf_counter()
    fitter = EMFitter(K, random_state=seed, progress=progress, **fit_kwargs)
    fit = fitter.fit(design.X, counts=sample.counts)
    t_fit = time.perf_counter() - t0
    oracle_fitter = EMFitter(K, init=sample.truth, **fit_kwargs)
    oracle = oracle_fitter.fit(design.X, counts=sample.counts)
    t_oracle = time.perf_counter() - t0 - t_fit
    ev, ev_o = sim.evaluate(fit, true_head), sim.evaluate(oracle, true_head)
    Nh = heldout.counts.total
    ho = {
        name: float(h.loglik(heldout.counts)) / Nh
        for name, h in (("fit", fit), ("oracle", oracle), ("truth", true_head))
    }
    alpha = sample.truth["alpha"]
    with torch.no_grad():
        comp_true = true_head.component_log_probs()
    entropy = [float(-(comp_true[:, k].exp() * comp_true[:, k]).sum()) for k in range(K)]
    result = {
        "prompts": DEMO_PROMPTS,
        "weights": DEMO_WEIGHTS,
        "n_tokens": n_tokens,
        "n_distinct": sample.counts.n_distinct,
        "fit": ev,
        "oracle": ev_o,
        "heldout_loglik": ho,
        "entropy": entropy,
        "efficient_kl": [L / (2 * n_tokens * float(a)) for a in alpha],
        "alpha_fit": fit.alpha.detach()[torch.tensor(ev["perm"])].tolist(),
        "n_iter": fitter.n_iter_,
        "polish": fitter.polish_,
        "oracle_polish": oracle_fitter.polish_,
        "objective": {"fit": fitter.objective_, "oracle": oracle_fitter.objective_},
        "best_start": fitter.init_names_[fitter.best_init_],
        "seconds": {"load": t_load, "fit": t_fit, "oracle": t_oracle, "total": time.perf_counter() - t_start},
    }
    return result


def print_demo(r: dict) -> None:
    print(
        f"\nSmolLM2-135M-Instruct, K = {len(r['prompts'])} prompts, N = {r['n_tokens']:,} next tokens "
        f"({r['n_distinct']:,} distinct); fit with EMFitter's defaults (best start: "
        f"{r['best_start']}), {r['n_iter']} EM iterations"
        + (f" + {r['polish']['n_iter']} L-BFGS iterations" if r.get("polish") else "")
    )
    print(f"\n{'prompt':<38}{'alpha':>6}{'fit':>7}{'entropy':>8}{'KL fit':>10}{'KL oracle':>10}{'L/2Na':>9}{'cos':>7}")
    for k, prompt in enumerate(r["prompts"]):
        print(
            f"{prompt.encode('unicode_escape').decode()[:36]:<38}{r['weights'][k]:>6.2f}{r['alpha_fit'][k]:>7.3f}"
            f"{r['entropy'][k]:>8.2f}{r['fit']['component_kl'][k]:>10.2e}{r['oracle']['component_kl'][k]:>10.2e}"
            f"{r['efficient_kl'][k]:>9.1e}{r['fit']['cosine'][k]:>7.3f}"
        )
    ratio = max(f / max(o, 1e-300) for f, o in zip(r["fit"]["component_kl"], r["oracle"]["component_kl"]))
    ho = r["heldout_loglik"]
    print(
        f"\nmixture TV(true, fit) = {r['fit']['tv']:.4f}   |alpha_hat - alpha|_1 = {r['fit']['weight_error']:.4f}   "
        f"max KL ratio fit / oracle = {ratio:.3f}"
    )
    print(
        f"held-out loglik/token: fit {ho['fit']:.6f}, oracle {ho['oracle']:.6f}, truth {ho['truth']:.6f} "
        f"(fit - oracle = {ho['fit'] - ho['oracle']:+.2e})"
    )
    s = r["seconds"]
    print(
        f"objective/token: fit {r['objective']['fit']:.7f}, oracle {r['objective']['oracle']:.7f}\n"
        f"time: load {s['load']:.1f} s, fit {s['fit']:.1f} s, oracle {s['oracle']:.1f} s, whole demo {s['total']:.1f} s"
    )
