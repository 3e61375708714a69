"""The race: the default EMFitter vs plain float64 torch.optim.LBFGS vs the library's L-BFGS phase alone.

Every method starts from the same point and records its parameters (with a wall-clock time stamp) after
each iteration; afterwards ONE float64 function (``loglik_per_token``: the design cast to float64, the
exact marginal log-likelihood per token minus the library's default ridge penalty, which plain L-BFGS
optimises too) evaluates every recorded point. The target of a problem is the
best objective any method reached minus 1e-7 per token; a method's time is the first time stamp whose
point meets the target (``inf`` if none). Ratios are measured side by side in one process.

- ``default``: ``EMFitter(n_components=K, init=start)`` on the design as given (float32 here);
- ``plain``: float64 ``torch.optim.LBFGS`` (strong Wolfe, history 20) with autograd on the marginal
  log-likelihood: the twenty lines a PyTorch user writes (``plain_lbfgs`` below), the float64 copy of the
  design included in its time;
- ``qn``: :func:`torch_softmix.polish.polish` alone from the start.

Problems: Gaussian designs (p = 32768, N = 10^6) with L in {16, 64, 192, 576}, K in {2, 5, 8}, starts
near (truth + 20%), far (truth + 100%) and random; SmolLM2's embedding with real hidden states of random
prompts, K in {4, 8}, the same three starts.

On a GPU (``--device cuda``, ``--dtype float32`` or ``bfloat16`` for the design) every method runs there; the
clock waits for the device at each time stamp, and each row also reports the default fit's seconds per pass
over ``X`` during EM against the time of one ``X @ B`` (``B`` of shape ``(L, K)`` in the design's dtype).

    python benchmarks/race_lbfgs.py [--quick] [--out benchmarks/results/race_lbfgs]
    python benchmarks/race_lbfgs.py --device cuda --dtype bfloat16 --no-smollm2 --out race_lbfgs_cuda_bf16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from torch_softmix import EMFitter, TokenCounts, kernels
from torch_softmix import simulate as sim
from torch_softmix.design import Design
from torch_softmix.polish import polish

RESULTS = Path(__file__).resolve().parent / "results"
GAP = 1e-7


#: The library's default ridge per token; every method optimises and is scored on the same penalised objective
#: (on LM designs atoms have norms ~50-100, so the penalty moves the optimum by ~1e-4 nats per token).
RIDGE = 1e-6


def objective(X64: torch.Tensor, bias, counts: TokenCounts, log_alpha, beta) -> torch.Tensor:
    """THE objective, as a differentiable float64 scalar: exact marginal log-likelihood per token minus the ridge
    penalty (``log_alpha`` need not be normalised)."""
    lg = X64 @ beta.double().T
    if bias is not None:
        lg = lg + bias.double()[:, None]
    log_s = lg - torch.logsumexp(lg, 0)
    lp = torch.logsumexp(log_s[counts.support] + torch.log_softmax(log_alpha.double(), 0), 1)
    return (counts.values.double() * lp).sum() / counts.total - 0.5 * RIDGE * (beta.double() ** 2).sum()


def loglik_per_token(X64: torch.Tensor, bias, counts: TokenCounts, log_alpha, beta) -> float:
    """:func:`objective` as a float: how every method's recorded points are scored."""
    return float(objective(X64, bias, counts, log_alpha, beta))


def plain_lbfgs(X, bias, counts: TokenCounts, alpha0, beta0, max_iter: int, record):
    """What a PyTorch user writes: float64 autograd L-BFGS on the marginal log-likelihood."""
    X64 = X.double()
    b64 = None if bias is None else bias.double()
    sup, n, N = counts.support, counts.values.double(), counts.total
    beta = beta0.double().clone().requires_grad_(True)
    u = torch.log(alpha0.double()).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([beta, u], lr=1, max_iter=max_iter, max_eval=int(1.25 * max_iter), history_size=20,
                            tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        lg = X64 @ beta.T if b64 is None else X64 @ beta.T + b64[:, None]
        log_s = torch.log_softmax(lg, 0)
        loss = -(n * torch.logsumexp(log_s[sup] + torch.log_softmax(u, 0), 1)).sum() / N
        loss = loss + 0.5 * RIDGE * (beta**2).sum()  # the same ridge as the library's default
        loss.backward()
        record(u.detach(), beta.detach())
        return loss

    opt.step(closure)


class Recorder:
    """Time stamps and parameter copies; the clock is paused while copying."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.paused = 0.0
        self.points: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def __call__(self, log_alpha, beta) -> None:
        if beta.is_cuda:
            torch.cuda.synchronize(beta.device)
        t = time.perf_counter()
        self.points.append((t - self.t0 - self.paused, log_alpha.detach().double().clone(), beta.detach().double().clone()))
        self.paused += time.perf_counter() - t


def run_methods(X, bias, counts, start, K, max_iter):
    runs = {}
    design = Design(X, bias)
    kernels.PASSES[0] = 0.0
    rec = Recorder()
    rec(torch.log(start["alpha"]), start["beta"])
    fitter = EMFitter(K, init=start, random_state=0)
    em = {"passes": 0.0, "maps": 0, "time": 0.0}  # up to the last EM iteration (before polish, moves)

    def on_event(ev):
        rec(ev.log_alpha, ev.beta)
        if ev.phase == "em":
            em.update(passes=kernels.PASSES[0], maps=ev.n_iter, time=rec.points[-1][0])

    fitter.fit(design, counts=counts, callback=on_event)
    rec(fitter.head_.log_alpha, fitter.head_.beta)
    runs["default"] = (rec, {"n_iter": fitter.n_iter_, "polish": fitter.polish_, "stop": fitter.stop_reason_,
                             "em_passes": em["passes"], "em_maps": em["maps"], "em_time": em["time"],
                             "passes": kernels.PASSES[0]})
    rec = Recorder()
    rec(torch.log(start["alpha"]), start["beta"])
    plain_lbfgs(X, bias, counts, start["alpha"], start["beta"], max_iter, rec)
    runs["plain"] = (rec, {"n_evals": len(rec.points) - 1})
    design = Design(X, bias)  # fresh: the whitening is part of the phase's time
    rec = Recorder()
    rec(torch.log(start["alpha"]), start["beta"])
    pr = polish(X, counts, start["beta"], torch.log(start["alpha"]), 1e-6 * counts.total, design.whitening,
                bias=bias, max_iter=max_iter, tol=1e-10, on_iteration=lambda i, f, ll, b, la: rec(la, b))
    rec(pr.log_alpha, pr.beta)
    runs["qn"] = (rec, {"n_iter": pr.n_iter, "n_passes": pr.n_passes})
    return runs


def score(X, bias, counts, runs) -> dict:
    X64 = X.double()
    curves = {}
    for name, (rec, _) in runs.items():
        curves[name] = [(t, loglik_per_token(X64, bias, counts, la, b)) for t, la, b in rec.points]
    best = max(v for c in curves.values() for _, v in c)
    target = best - GAP
    out = {"best": best}
    for name, curve in curves.items():
        hit = [t for t, v in curve if v >= target]
        out[name] = {"time": hit[0] if hit else math.inf, "final": curve[-1][1], "reached": bool(hit),
                     "total_time": curve[-1][0], **runs[name][1]}
    return out


def matmul_seconds(X: torch.Tensor, K: int, repeats: int = 20) -> float:
    """Median time of one ``X @ B`` with ``B (L, K)`` in ``X``'s dtype on ``X``'s device."""
    B = torch.randn(X.shape[1], K, dtype=X.dtype, device=X.device)
    times = []
    for _ in range(repeats + 3):
        if X.is_cuda:
            torch.cuda.synchronize(X.device)
        t = time.perf_counter()
        X @ B
        if X.is_cuda:
            torch.cuda.synchronize(X.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[3:])


def gaussian_problem(L: int, K: int, kind: str, seed: int, p: int, N: int, dtype=torch.float32):
    X = sim.gaussian_design(p, L, seed=seed, dtype=torch.float32)
    truth = sim.random_mixture(K, L, norm=3.0, separation=2.0, min_weight=0.5 / K, seed=seed + 1)
    # the counts are drawn from the design in the dtype the methods see (bfloat16 rounds the rows)
    X = X.to(dtype)
    counts = TokenCounts.from_dense(sim.sample_counts(sim.make_head(X.float(), truth, dtype=torch.float64), N,
                                                      seed=seed + 2))
    return X, None, counts, truth, _start(truth, kind, seed)


def _start(truth, kind: str, seed: int):
    if kind == "near":
        return sim.perturbed_start(truth, 0.2, seed=seed + 3)
    if kind == "far":
        return sim.perturbed_start(truth, 1.0, seed=seed + 3)
    K, L = truth["beta"].shape
    other = sim.random_mixture(K, L, norm=float(truth["beta"].norm(dim=1).mean()), seed=seed + 4)
    return {"alpha": torch.full((K,), 1.0 / K, dtype=torch.float64), "beta": other["beta"]}


def smollm2_problem(K: int, kind: str, seed: int, N: int, model_tok):
    from prompts import PROMPT_POOL

    from torch_softmix import hf

    model, tok = model_tok
    design = hf.output_design(model)
    g = torch.Generator().manual_seed(seed)
    prompts = [PROMPT_POOL[i] for i in torch.randperm(len(PROMPT_POOL), generator=g)[:K].tolist()]
    alpha = torch.distributions.Dirichlet(torch.full((K,), 2.0, dtype=torch.float64)).sample()
    sample = hf.sample_next_tokens(model, tok, prompts, N, weights=alpha.tolist(), seed=seed)
    truth = {"alpha": sample.truth["alpha"].double(), "beta": sample.truth["beta"].double()}
    return design.X, design.bias, sample.counts, truth, _start(truth, kind, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few small problems (a smoke test)")
    ap.add_argument("--p", type=int, default=32768)
    ap.add_argument("--N", type=int, default=1_000_000)
    ap.add_argument("--max-iter", type=int, default=2000)
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--only", default=None, help="run the problems whose name contains this")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="where every method runs (cpu or cuda)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the Gaussian design's dtype")
    ap.add_argument("--L", type=int, nargs="+", default=[16, 64, 192, 576], help="the Gaussian designs' widths")
    ap.add_argument("--K", type=int, nargs="+", default=[2, 5, 8], help="the Gaussian problems' K")
    ap.add_argument("--starts", nargs="+", default=["near", "far", "random"], choices=["near", "far", "random"])
    ap.add_argument("--out", type=Path, default=RESULTS / "race_lbfgs")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = [(L, K, kind) for L in args.L for K in args.K for kind in ("near", "far", "random")]
    if args.quick:
        grid = [(16, 2, "near"), (64, 5, "far"), (192, 8, "random")]
        args.p, args.no_smollm2 = 8192, True
    rows_path = args.out.with_suffix(".jsonl")
    done = {}
    if rows_path.is_file() and not args.quick:  # a smoke test never reuses recorded rows
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[r["problem"]] = r
    size = "" if args.p == 32768 else f"p={args.p} "
    problems = [(f"gauss {size}L={L} K={K} {kind}", ("gauss", L, K, kind)) for L, K, kind in grid]
    if not args.no_smollm2:
        problems += [(f"smollm2 K={K} {kind}", ("smollm2", 576, K, kind)) for K in (4, 8) for kind in ("near", "far", "random")]
    model_tok = None
    # every method once on a small problem first: first calls (autograd, CUDA start-up and kernels, lazy
    # imports) stay out of the clock of the first problem
    X, bias, counts, truth, start = gaussian_problem(16, 2, "near", 0, 4096, 10_000, getattr(torch, args.dtype))
    dev = torch.device(args.device)
    run_methods(X.to(dev), None, counts.to(dev), {k: v.to(dev) for k, v in start.items()}, 2, 30)
    for i, (name, (src, L, K, kind)) in enumerate(problems):
        # seeds follow the position in the whole list, so that a subset runs the same problems
        if name in done or (args.only and args.only not in name) or kind not in args.starts:
            continue
        if src == "gauss":
            X, bias, counts, truth, start = gaussian_problem(L, K, kind, 100 + i, args.p, args.N,
                                                             getattr(torch, args.dtype))
        else:
            if model_tok is None:
                from torch_softmix import hf

                model_tok = hf.load_smollm2()
            X, bias, counts, truth, start = smollm2_problem(K, kind, 200 + i, args.N, model_tok)
        X, counts = X.to(dev), counts.to(dev)
        bias = None if bias is None else bias.to(dev)
        start = {k: v.to(dev) for k, v in start.items()}
        row = {"problem": name, **score(X, bias, counts, run_methods(X, bias, counts, start, K, args.max_iter))}
        row.update(device=str(dev), design_dtype=str(X.dtype).removeprefix("torch."), matmul_s=matmul_seconds(X, K))
        row["plain/default"] = row["plain"]["time"] / row["default"]["time"]
        row["qn/default"] = row["qn"]["time"] / row["default"]["time"]
        done[name] = row
        if not args.quick:
            with rows_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        print(f"{name:28s} default {row['default']['time']:7.2f}s  plain {row['plain']['time']:7.2f}s  "
              f"qn {row['qn']['time']:7.2f}s  plain/default {row['plain/default']:5.2f}", flush=True)
    report([done[n] for n, _ in problems if n in done], args)


def fmt_ratio(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else "–"


def pass_vs_matmul(r: dict) -> float:
    """The default fit's seconds per pass over X during EM, over the time of one ``X @ B``."""
    d = r["default"]
    if not d.get("em_passes") or not r.get("matmul_s"):
        return math.nan
    return d["em_time"] / d["em_passes"] / r["matmul_s"]


def report(rows: list[dict], args) -> None:
    def fmt(x: float) -> str:
        return "not reached" if not math.isfinite(x) else f"{x:.2f}"

    lines = ["| problem | default (s) | plain L-BFGS f64 (s) | L-BFGS phase alone (s) | plain / default | "
             "EM maps | passes per EM map | default, whole fit (s) | EM time per pass / X @ B |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["default"]
        ppm = d["em_passes"] / d["em_maps"] if d.get("em_maps") else math.nan
        lines.append(f"| {r['problem']} | {fmt(d['time'])} | {fmt(r['plain']['time'])} | {fmt(r['qn']['time'])} | "
                     f"{fmt(r['plain/default'])} | {d.get('em_maps', 0)} | {ppm:.1f} | {d['total_time']:.2f} | "
                     f"{fmt_ratio(pass_vs_matmul(r))} |")
    both = [r["plain/default"] for r in rows if r["default"]["reached"] and r["plain"]["reached"]]
    maps = [r["default"] for r in rows if r["default"].get("em_maps")]
    ppm_all = sum(d["em_passes"] for d in maps) / max(1, sum(d["em_maps"] for d in maps))
    summary = (f"\n{len(rows)} problems; both reached the target on {len(both)}: plain / default median "
               f"{statistics.median(both):.2f}, min {min(both):.2f}, ≥ 2× on {sum(x >= 2 for x in both)}/{len(both)}, "
               f"≥ 3× on {sum(x >= 3 for x in both)}/{len(both)}; default reached the target on "
               f"{sum(r['default']['reached'] for r in rows)}/{len(rows)}, plain on "
               f"{sum(r['plain']['reached'] for r in rows)}/{len(rows)}, the L-BFGS phase alone on "
               f"{sum(r['qn']['reached'] for r in rows)}/{len(rows)}; EM: {ppm_all:.1f} passes over X per map "
               "(all maps of all problems)")
    ratios = [x for x in map(pass_vs_matmul, rows) if math.isfinite(x)]
    if ratios:
        summary += (f"; EM time per pass over one X @ B: median {statistics.median(ratios):.1f} "
                    f"({len(ratios)} problems with the timing)")
    text = "\n".join(lines) + summary + "\n"
    print(text)
    if not args.quick:
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
