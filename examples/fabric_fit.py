"""The same EM fit with the vocabulary shared among processes launched by Lightning Fabric.

    python examples/fabric_fit.py --devices 2                  # gloo on CPU (about 15 s here)
    python examples/fabric_fit.py --devices 8 --accelerator cuda   # NCCL, one GPU per process

Fabric starts the processes and the process group (``strategy="ddp"``); the fit only needs the design to
know it: ``Design(X, comm=Comm.from_env())`` gives each process a contiguous slice of the rows of ``X`` and
makes every sum over the vocabulary an all-reduce. The EM parameters are not wrapped in DDP: they are not
trained by gradients, every rank holds the same weights and atoms. Rank 0 saves the head and checks that
it equals a single-process fit of the same data (up to the order of the components).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch

from torch_softmix import Design, EMFitter
from torch_softmix import simulate as sim
from torch_softmix.dist import Comm


def fit(fabric: L.Fabric, args: argparse.Namespace) -> None:
    X = sim.gaussian_design(args.p, args.L, seed=0, dtype=torch.float64).to(fabric.device)
    truth = sim.random_mixture(args.K, args.L, norm=3.0, separation=2.0, seed=1)
    counts = sim.sample_counts(sim.make_head(X, truth), args.N, seed=2)
    design = Design(X, comm=Comm.from_env())  # the default process group that Fabric set up
    fitter = EMFitter(args.K, n_init=3, random_state=0)  # the defaults, split-and-merge moves included
    head = fitter.fit(design, counts=counts)
    if fabric.global_rank == 0:
        head.save(args.out)
        alone = EMFitter(args.K, n_init=3, random_state=0).fit(X, counts=counts)  # one process, no group
        # a mixture is the same under a relabelling of its components: starts that tie in screening (two k-means
        # starts reaching one optimum in two orders) may be picked differently by rounding on R ranks
        perm = sim.match_components(alone.beta.detach(), head.beta.detach())
        gap = float((alone.beta[perm] - head.beta).detach().abs().max())
        print(
            f"{fabric.world_size} processes, rows per rank {design.hi - design.lo}/{design.vocab_size}: "
            f"{fitter.n_iter_} EM iterations, loglik/token {fitter.lower_bound_:.6f}, best start "
            f"{fitter.init_names_[fitter.best_init_]}; max |beta - single-process beta| = {gap:.1e} (components matched); saved {args.out}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--p", type=int, default=20_000)
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--K", type=int, default=3)
    ap.add_argument("--N", type=int, default=10**6)
    ap.add_argument("--out", default="fabric_head.safetensors")
    args = ap.parse_args()
    fabric = L.Fabric(accelerator=args.accelerator, strategy="ddp", devices=args.devices)
    fabric.launch(fit, args)


if __name__ == "__main__":
    main()
