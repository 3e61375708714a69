"""Tasks run by each rank of the multi-process tests (tests/test_dist.py, gloo on the CPU; tests/test_cuda.py,
CUDA tensors over NCCL, or gloo when there are fewer GPUs than ranks).

``python -m tests.dist_worker`` is not a CLI: :func:`launch` starts ``world_size`` processes with
``torch.multiprocessing`` and each runs :func:`main`, which joins a process group (``args['backend']``,
default gloo) through a file,
runs the named tasks, and saves each rank's results to ``out_dir/<rank>.pt``. :func:`run_tasks` runs the
same tasks in the calling process without a process group (the single-process reference).
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from torch_softmix import Design, EMFitter, curvature, kernels
from torch_softmix import simulate as sim
from torch_softmix.dist import Comm, RankFailure

P, L, K = 1001, 6, 3  # 1001 rows: an uneven split over 2 and 3 ranks


P_LARGE = 9001  # above 4 x curvature.TOP_TOKENS: the block preconditioner is built from each law's top tokens


def problem(p: int = P, norm: float = 2.0, separation: float = 1.0):
    X = sim.gaussian_design(p, L, seed=0, dtype=torch.float64)
    truth = sim.random_mixture(K, L, norm=norm, separation=separation, seed=1)
    counts = sim.sample_counts(sim.make_head(X, truth), 50_000, seed=2)
    return X, truth, counts


def _fit_result(fitter, head) -> dict:
    return {
        "device": head.beta.device.type,
        "beta": head.beta.detach().cpu().clone(),
        "log_alpha": head.log_alpha.detach().cpu().clone(),
        "objective": fitter.objective_,
        "n_iter": fitter.n_iter_,
        "init_names": fitter.init_names_,
        "init_results": fitter.init_results_,
        "best_init": fitter.best_init_,
        "moves": fitter.moves_,
    }


def merged_and_split(truth: dict) -> dict:
    """A start in the wrong basin the moves leave: components 0 and 1 share one atom, component 2 has two."""
    b = truth["beta"]
    d = torch.randn(L, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = d / d.norm() * 0.2 * float(b[2].norm())
    return {"alpha": torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64),
            "beta": torch.stack([(b[0] + b[1]) / 2, b[2] + d, b[2] - d])}  # fmt: skip


def fit_task(comm: Comm, args: dict, name: str) -> dict:
    # further apart for the moves: EM and L-BFGS stay in merged_and_split's basin, 0.6 nats per token below
    X, truth, counts = problem(P_LARGE if name == "large-vocab" else P, *((4.0, 2.0) if name == "moves" else ()))
    settings = {
        "moves": dict(init=merged_and_split(truth), random_state=0, max_iter=40, polish_iter=15, n_transfers=0),
        "seedless": dict(n_init=2, max_iter=30, n_moves=0, n_transfers=0),
        "given": dict(init=sim.perturbed_start(truth, 0.4, seed=3), max_iter=40, tol=1e-13, polish_iter=15, n_moves=0, n_transfers=0),
        "default": dict(n_init=3, random_state=0, max_iter=60, n_moves=0, n_transfers=0),
        "kmeans": dict(init="kmeans", n_init=2, random_state=0, max_iter=30, n_moves=0, n_transfers=0),
        "random-newton": dict(init="random", n_init=2, random_state=1, max_iter=20, m_step="newton", n_moves=0, n_transfers=0),
        "large-vocab": dict(init=sim.perturbed_start(truth, 0.4, seed=3), max_iter=25, tol=0, polish_iter=0, n_moves=0, n_transfers=0),
    }[name]
    device = args.get("device", "cpu")
    fitter = EMFitter(K, **settings)
    head = fitter.fit(Design(X.to(device), comm=comm), counts=counts.to(device))
    return _fit_result(fitter, head)


def count_task(comm: Comm, args: dict) -> dict:
    """Collectives (calls and bytes by name) of each EM iteration, for two vocabulary sizes, and of one build of
    the M-step's block preconditioner from the top tokens of a larger vocabulary."""
    out = {}
    for p in (1001, 4003):
        X = sim.gaussian_design(p, L, seed=0, dtype=torch.float64)
        truth = sim.random_mixture(K, L, norm=2.0, separation=1.0, seed=1)
        counts = sim.sample_counts(sim.make_head(X, truth), 50_000, seed=2)
        out[p] = {}
        default = kernels.FUSE_MIN_WIDTH
        for how, width in (("apart", default), ("fused", 0)):  # L = 6: fused only when the width rule is lifted
            kernels.FUSE_MIN_WIDTH = width
            design = Design(X, comm=comm)
            per_iter, last = [], {}

            def snapshot(event, per_iter=per_iter, last=last):
                now = {k: (comm.calls[k], comm.bytes[k]) for k in comm.calls}
                per_iter.append({k: (c - last.get(k, (0, 0))[0], b - last.get(k, (0, 0))[1])
                                 for k, (c, b) in now.items()})  # fmt: skip
                last.clear()
                last.update(now)

            fitter = EMFitter(K, init=truth, accelerate=None, m_step="newton-cg", max_iter=6, tol=0, polish_iter=0,
                              n_moves=0)  # EM iterations alone
            comm.reset_counts()
            try:
                fitter.fit(design, counts=counts, callback=snapshot)
            finally:
                kernels.FUSE_MIN_WIDTH = default
            out[p][how] = per_iter[1:]  # the first delta also holds the start's E-step
    X, truth, counts = problem(P_LARGE)
    design = Design(X, comm=comm)
    whitening = design.whitening
    comm.reset_counts()
    curvature.BlockPreconditioner.build(design.X, truth["beta"], truth["alpha"], 1.0, None, whitening,
                                        torch.float64, None, comm)  # fmt: skip
    out["build"] = {k: (comm.calls[k], comm.bytes[k]) for k in comm.calls}
    return out


def top_token_task(comm: Comm, args: dict) -> list[int]:
    """The global id of the most frequent token (what a "peak" split of :mod:`torch_softmix.moves` separates:
    :func:`torch_softmix.starts.frequent_rows`) as each rank finds it, for counts with ties at the top across
    the ranks' rows."""
    from torch_softmix.data import TokenCounts
    from torch_softmix.starts import frequent_rows

    design = Design(sim.gaussian_design(P, L, seed=0, dtype=torch.float64), comm=comm)
    out = []
    for dense in (torch.arange(P, dtype=torch.float64) % 97, torch.flip(torch.arange(P, dtype=torch.float64), [0])):
        share = TokenCounts.from_dense(dense).rows(design.lo, design.hi)
        ids, _, _ = frequent_rows(design.X, share, 1, comm, design.lo)
        out.append(int(ids[0]))
    return out


def sample_task(comm: Comm, args: dict) -> dict:
    from torch_softmix import hf

    model, tok = hf.load_model(args["model_dir"])
    folder = Path(args["out_dir"]) / f"shards-{comm.world_size}"
    prompts = ["hello world", "the cat sat on", "1 2 3 4"]
    nxt = hf.sample_next_tokens(
        model, tok, prompts, 20_000, weights=[0.5, 0.3, 0.2], seed=3, out_dir=folder, shard_size=3000, comm=comm
    )
    streams = hf.sample_streams(model, tok, prompts, n_sequences=6, max_new_tokens=5, batch_size=2, seed=4, comm=comm)
    return {"next": nxt.counts.dense(), "streams": streams.counts.dense(), "folder": str(folder)}


def kill_task(comm: Comm, args: dict) -> dict:
    """Rank ``args['victim']`` dies after EM iteration ``args['kill_at']``; the others must fail fast."""
    X, truth, counts = problem()
    fitter = EMFitter(K, **checkpointed_settings(args["checkpoint"]))
    died = Path(args["out_dir"]) / "died_at"

    def die(event):
        if comm.rank == args["victim"] and event.n_iter >= args["kill_at"]:
            died.write_text(repr(time.time()))
            os._exit(1)

    try:
        fitter.fit(Design(X, comm=comm), counts=counts, callback=die)
    except RankFailure as err:
        return {"error": str(err), "caught_at": time.time()}
    return {"error": None}


def resume_task(comm: Comm, args: dict) -> dict:
    X, truth, counts = problem()
    fitter = EMFitter(K, **checkpointed_settings(args["checkpoint"]))
    return _fit_result(fitter, fitter.fit(Design(X, comm=comm), counts=counts))


def checkpointed_settings(path) -> dict:
    return dict(init="subspace", n_init=2, init_max_iter=3, max_iter=40, tol=0, random_state=0,
                checkpoint=path, checkpoint_every=2, n_moves=0, n_transfers=0)  # fmt: skip


TASKS = {
    "given": lambda c, a: fit_task(c, a, "given"),
    "default": lambda c, a: fit_task(c, a, "default"),
    "kmeans": lambda c, a: fit_task(c, a, "kmeans"),
    "random-newton": lambda c, a: fit_task(c, a, "random-newton"),
    "large-vocab": lambda c, a: fit_task(c, a, "large-vocab"),
    "moves": lambda c, a: fit_task(c, a, "moves"),
    "seedless": lambda c, a: fit_task(c, a, "seedless"),
    "count": count_task,
    "top_token": top_token_task,
    "sample": sample_task,
    "kill": kill_task,
    "resume": resume_task,
}


def run_tasks(comm: Comm, tasks: list[str], args: dict) -> dict:
    return {name: TASKS[name](comm, args) for name in tasks}


def main(rank: int, world_size: int, tasks: list[str], args: dict) -> None:
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    backend = args.get("backend", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    tdist.init_process_group(
        backend,
        init_method=f"file://{args['init_file']}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=args.get("timeout", 60)),
    )
    comm = Comm.from_env()
    results = run_tasks(comm, tasks, args)
    torch.save(results, Path(args["out_dir"]) / f"{rank}.pt")
    tdist.destroy_process_group()


def launch(world_size: int, tasks: list[str], args: dict, join_timeout: float = 240) -> list[dict | None]:
    """Run ``tasks`` on ``world_size`` processes; each rank's results (``None`` for a rank that died)."""
    out = Path(args["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    args = {**args, "init_file": str(out / f"init-{time.time_ns()}")}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=main, args=(r, world_size, tasks, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(join_timeout)
        if p.is_alive():
            p.kill()
    return [torch.load(out / f"{r}.pt") if (out / f"{r}.pt").exists() else None for r in range(world_size)]
