"""Which start should EM use? MoM vs random vs subspace restarts vs the oracle (issue: MoM warm start).

Gaussian designs (p = 20000, L = 16): K in {2, 3, 4, 6, 8} at N = 10^6, and N in {10^4, 10^5, 10^6}
at K = 3, with ``--seeds`` seeds per cell. Optionally the same on a real embedding (``--design smollm2``:
SmolLM2-135M's output embedding, p = 49152, L = 576), with atoms drawn in whitened coordinates.

For every (cell, seed) it runs: MoM alone (tensor and univariate), EM from MoM (both), EM from one
random start, EM from 10 subspace restarts, EM from 3 k-means starts, the default ``EMFitter(K)`` (MoM and
k-means starts, L-BFGS phase, split-and-merge moves; nothing set but the seed), and the oracle (EM from
the truth), recording the
Hungarian-matched max relative atom error, weight error, per-token log-likelihood and wall time.

Resumable: each finished run is appended to a JSON-lines file and skipped when the script is run again.
At the end it writes a Markdown table and a plot next to that file.

    python benchmarks/experiment_starts.py [--seeds 10] [--design gaussian|smollm2] [--out benchmarks/results]
    python benchmarks/experiment_starts.py --design smollm2 --seeds 3 --max-iter 150 --tol 1e-8   # as run
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from torch_softmix import EMFitter, TokenCounts
from torch_softmix import simulate as sim
from torch_softmix.mom import mom_estimate
from torch_softmix.moments import Whitening

METHODS = [
    "mom_tensor",
    "mom_univariate",
    "em_mom_tensor",
    "em_mom_univariate",
    "em_random",
    "em_subspace",
    "em_kmeans",
    "em_default",
    "oracle",
]


def cells(design: str) -> list[tuple[int, int]]:
    if design == "gaussian":
        return [(K, 10**6) for K in (2, 3, 4, 6, 8)] + [(3, 10**4), (3, 10**5)]
    return [(2, 10**6), (3, 10**6), (4, 10**6)]


def load_design(design: str) -> torch.Tensor:
    if design == "gaussian":
        return sim.gaussian_design(20_000, 16, seed=0, dtype=torch.float64)
    from torch_softmix.hf import load_smollm2

    model, _ = load_smollm2()
    return model.get_output_embeddings().weight.detach().float()


def truth_for(X: torch.Tensor, whitening: Whitening, K: int, seed: int) -> dict[str, torch.Tensor]:
    """Atoms of norm 3 and separation 2 in whitened coordinates (peaked laws), weights >= 0.5 / K."""
    t = sim.random_mixture(K, whitening.rank, norm=3.0, separation=2.0, min_weight=0.5 / K, seed=1000 + seed)
    return {"alpha": t["alpha"], "beta": whitening.to_beta(t["beta"]).to(torch.float64)}


def run_one(method: str, X, counts, truth, true_head, seed: int, whitening, max_iter: int, tol: float) -> dict:
    K = truth["beta"].shape[0]
    t0 = time.perf_counter()
    out: dict = {}
    if method.startswith("mom_"):
        est = mom_estimate(X, TokenCounts.from_dense(counts), K, method=method[4:], whitening=whitening, seed=seed)
        out["ok"] = est.ok
        if est.ok:
            head = sim.make_head(X, {"alpha": est.alpha, "beta": est.beta})
        else:
            out["reason"] = est.reason
            head = None
    else:
        kw = {
            "em_mom_tensor": dict(init="mom", mom_method="tensor"),
            "em_mom_univariate": dict(init="mom", mom_method="univariate"),
            "em_random": dict(init="random"),
            "em_subspace": dict(init="subspace", n_init=10),
            "em_kmeans": dict(init="kmeans", n_init=3),
            "oracle": dict(init=truth),
        }.get(method)
        # em_default: the fitter exactly as a user gets it, nothing set but the seed
        fitter = EMFitter(K, random_state=seed) if kw is None else EMFitter(K, random_state=seed, tol=tol,
                                                                             max_iter=max_iter, **kw)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head = fitter.fit(X, counts=counts)
        out.update(n_iter=fitter.n_iter_, loglik=fitter.lower_bound_, best_init=fitter.init_names_[fitter.best_init_])
        if fitter.init_info_.get("fallback"):
            out["fallback"] = fitter.init_info_["fallback"]
    out["seconds"] = time.perf_counter() - t0
    if head is not None:
        ev = sim.evaluate(head, true_head)
        out.update(
            atom_error=ev["atom_error_max"],
            atom_error_mean=ev["atom_error_mean"],
            weight_error=ev["weight_error"],
            tv=ev["tv"],
        )
    return out


def summarise(rows: list[dict], out_dir: Path, design: str) -> str:
    """Markdown table: median atom error, share within 1.1x of the oracle, median seconds per method and cell."""
    by = {}
    for r in rows:
        by.setdefault((r["K"], r["N"]), {}).setdefault(r["seed"], {})[r["method"]] = r
    lines = [
        f"Design: {design}. Median max relative atom error (share of seeds within 1.1x of the oracle; median seconds).",
        "",
        "| K | N | seeds | " + " | ".join(METHODS) + " |",
        "|---|---|---|" + "---|" * len(METHODS),
    ]
    for K, N in sorted(by):
        seeds = by[(K, N)]
        cells_txt = []
        for m in METHODS:
            errs, within, secs = [], [], []
            for runs in seeds.values():
                r, o = runs.get(m), runs.get("oracle")
                if r is None or o is None:
                    continue
                e = r.get("atom_error", np.inf)
                errs.append(e)
                within.append(e <= 1.1 * o["atom_error"])
                secs.append(r["seconds"])
            if errs:
                cells_txt.append(f"{np.median(errs):.3f} ({np.mean(within):.0%}; {np.median(secs):.2f}s)")
            else:
                cells_txt.append("-")
        lines.append(f"| {K} | {N:.0e} | {len(seeds)} | " + " | ".join(cells_txt) + " |")
    table = "\n".join(lines)
    (out_dir / f"starts_{design}.md").write_text(table + "\n")
    return table


def plot(rows: list[dict], out_dir: Path, design: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in METHODS:
        for ax, fixed, key, other in ((axes[0], 10**6, "K", "N"), (axes[1], 3, "N", "K")):
            pts = {}
            for r in rows:
                if r["method"] == m and r[other] == fixed and "atom_error" in r:
                    pts.setdefault(r[key], []).append(r["atom_error"])
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [np.median(pts[x]) for x in xs], marker="o", label=m)
    axes[0].set(xlabel="K", ylabel="median max relative atom error", yscale="log", title=f"{design}: N = 1e6")
    axes[1].set(
        xlabel="N", ylabel="median max relative atom error", xscale="log", yscale="log", title=f"{design}: K = 3"
    )
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"starts_{design}.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--design", default="gaussian", choices=["gaussian", "smollm2"])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--max-iter", type=int, default=500, help="EM iterations per fit")
    ap.add_argument("--tol", type=float, default=1e-9, help="EM tolerance (per-token objective)")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"starts_{args.design}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {(r["K"], r["N"], r["seed"], r["method"]) for r in rows}
    methods = args.methods.split(",")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    X = load_design(args.design)
    whitening = Whitening.from_design(X)
    for K, N in cells(args.design):
        for seed in range(args.seeds):
            todo = [m for m in methods if (K, N, seed, m) not in done]
            if not todo:
                continue
            truth = truth_for(X, whitening, K, seed)
            true_head = sim.make_head(X, truth, dtype=torch.float64)
            counts = sim.sample_counts(true_head, N, seed=seed)
            for m in todo:
                res = run_one(m, X, counts, truth, true_head, seed, whitening, args.max_iter, args.tol)
                row = {"K": K, "N": N, "seed": seed, "method": m, **res}
                rows.append(row)
                with path.open("a") as fh:  # one line per finished run: resumable
                    fh.write(json.dumps(row) + "\n")
                print(
                    f"K={K} N={N:.0e} seed={seed} {m:<18} err={res.get('atom_error', float('nan')):.4f} "
                    f"t={res['seconds']:.2f}s",
                    flush=True,
                )
    print(summarise(rows, out_dir, args.design))
    plot(rows, out_dir, args.design)


if __name__ == "__main__":
    main()
