"""Vocabulary-parallel EM on 1 and N processes (gloo on CPU, NCCL on GPUs): time per EM iteration, collectives
and bytes on the wire per iteration, measured side by side in one run.

    python benchmarks/bench_dist.py                       # p=131072, L=256, K=8, float32, 1 and 2 processes
    python benchmarks/bench_dist.py --p 49152 --L 576 --procs 1 2 --iters 10

Each configuration runs ``--iters`` EM iterations (no SQUAREM, Newton-CG, tol 0) from the truth plus noise;
the time per iteration excludes the start. Threads per process = cores / processes, so the comparison uses
the same cores. The wire column is what one rank sends per iteration (the sum of the all-reduced sizes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_softmix import Design, EMFitter  # noqa: E402
from torch_softmix import simulate as sim  # noqa: E402
from torch_softmix.dist import Comm  # noqa: E402


def one_run(rank: int, world: int, cfg: dict, out: str) -> None:
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, cfg["cores"] // world))
    if world > 1:
        tdist.init_process_group("gloo", init_method=f"file://{out}.init", rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=120))  # fmt: skip
    comm = Comm.from_env()
    X = sim.gaussian_design(cfg["p"], cfg["L"], seed=0)
    truth = sim.random_mixture(cfg["K"], cfg["L"], norm=3.0, seed=1)
    counts = sim.sample_counts(sim.make_head(X, truth), 10**6, seed=2)
    design = Design(X, comm=comm)
    times, wire = [], []

    def tick(event, last=[None, 0]):  # noqa: B006 - per-run state
        now, sent = time.perf_counter(), sum(comm.bytes.values())
        if last[0] is not None:
            times.append(now - last[0])
            wire.append(sent - last[1])
        last[0], last[1] = now, sent

    start = sim.perturbed_start(truth, 0.3, seed=3)
    fitter = EMFitter(cfg["K"], init=start, accelerate=None, m_step="newton-cg", max_iter=cfg["iters"], tol=0)
    fitter.fit(design, counts=counts, callback=tick)
    calls = sum(comm.calls.values())
    if rank == 0:
        res = {"world": world, "sec_per_iter": sorted(times)[len(times) // 2], "bytes_per_iter": sorted(wire)[len(wire) // 2],
               "collectives": calls, "iters": fitter.n_iter_}  # fmt: skip
        Path(out).write_text(json.dumps(res))
    if world > 1:
        tdist.destroy_process_group()


def measure(world: int, cfg: dict) -> dict:
    out = tempfile.mktemp(prefix="bench_dist_")
    if world == 1:
        one_run(0, 1, cfg, out)
    else:
        mp.start_processes(one_run, args=(world, cfg, out), nprocs=world, start_method="spawn")
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, default=131072)
    ap.add_argument("--L", type=int, default=256)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    cfg = vars(args)
    rows = [measure(w, cfg) for w in args.procs]
    base = rows[0]["sec_per_iter"]
    print(f"p={args.p}, L={args.L}, K={args.K}, float32 design, {args.cores} cores shared by the processes")
    print(f"{'processes':>9} {'s / EM iteration':>17} {'speed-up':>9} {'bytes sent / iteration':>23}")
    for r in rows:
        print(f"{r['world']:>9} {r['sec_per_iter']:>17.4f} {base / r['sec_per_iter']:>9.2f} {r['bytes_per_iter']:>23,}")


if __name__ == "__main__":
    main()
