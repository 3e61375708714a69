"""Fit checkpoints: what identifies a fit, writing its state as it runs, and resuming it (docs/format.md).

A checkpoint is keyed by everything that changes the result: the design *and* its bias (fingerprint),
the counts (sha256 of support and values), the compute dtype and every setting that shapes the path
of the fit (start, number of starts, screening length, seed, ridge, tolerance, M-step, accelerator).
A checkpoint whose key differs is refused, never silently resumed. The fitter reads it *before*
computing starts: a resumed fit does not redo them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .curvature import BlockPreconditioner
from .data import TokenCounts
from .engine import FitProblem, Point, State
from .io import read_checkpoint, write_checkpoint
from .mstep import AtomState


def counts_digest(counts: TokenCounts) -> str:
    """A digest of the counts of the whole vocabulary (the same however many ranks share it)."""
    digest = hashlib.sha256()
    digest.update(counts.support.cpu().numpy().tobytes())
    digest.update(counts.values.cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def start_digest(alpha: Tensor, beta: Tensor) -> str:
    """A digest of a given start (``init=`` a head or a dict), so that another start is another fit."""
    digest = hashlib.sha256()
    for t in (alpha, beta):
        digest.update(t.detach().to(device="cpu", dtype=torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def checkpoint_key(problem: FitProblem, settings: dict[str, Any], counts: TokenCounts | None = None) -> dict[str, str]:
    """What a checkpoint must match to be resumed (all values are strings). ``counts`` are those of the whole
    vocabulary (default ``problem.counts``, which is that with a single rank)."""
    shaped = {
        **settings,
        "ridge": problem.ridge,
        "tol": problem.tol,
        "m_step": problem.m_step,
        "m_step_iter": problem.m_step_iter,
        "cg_max_iter": problem.cg_max_iter,
        "cg_rtol": problem.cg_rtol,
    }
    return {
        "embedding_fingerprint": problem.design.fingerprint,
        "counts_sha256": counts_digest(problem.counts if counts is None else counts),
        "settings": json.dumps(shaped, sort_keys=True, default=str),
        "dtype": str(problem.dtype),
    }


class Checkpointer:
    """A run callback that writes the state atomically every ``every`` EM iterations.

    ``extra`` (a dict, read at each write) is stored with the state: the fitter records there what the
    screening of its starts found, so a resumed fit reports the same starts. With rows shared among ranks
    only rank 0 writes, and the cached logits (each rank's own rows) are not stored: a resume recomputes
    them from the atoms, so it may use another number of ranks.
    """

    def __init__(
        self, path: str | os.PathLike, key: dict[str, str], every: int, extra: dict | None = None, comm=None
    ) -> None:
        self.path, self.key, self.every, self.comm = os.fspath(path), key, every, comm
        self.extra = extra if extra is not None else {}
        self.last_written = -1
        self.n_written = 0

    def __call__(self, point: Point, history: list[dict], n_iter: int) -> bool:
        """Write the state if ``every`` iterations have passed since the last write; returns whether it wrote."""
        if self.last_written >= 0 and n_iter - self.last_written < self.every:
            return False
        self.last_written = n_iter
        atoms = point.state.atoms
        tensors = {"log_alpha": point.state.log_alpha, "beta": atoms.beta}
        if self.comm is None or not self.comm.distributed:
            tensors.update(logits=atoms.logits, A=atoms.A)  # a single-process resume is then bit-exact
        if atoms.precond is not None:  # what the M-step's preconditioner was built from: a resume rebuilds it
            pc = atoms.precond
            tensors.update(precond_beta=pc.beta, precond_W=pc.W, precond_age=torch.tensor([pc.age]))
        if self.comm is None or self.comm.rank == 0:
            write_checkpoint(self.path, tensors, {**self.key, "n_maps": n_iter, "history": history, **self.extra})
        self.n_written += 1
        return True


def resume(path: str | os.PathLike, key: dict[str, str], problem: FitProblem) -> tuple[State, dict] | None:
    """The saved state and metadata (``n_maps``, ``history``, what the fitter stored) if ``path`` exists.

    Raises ``ValueError`` when the file belongs to another fit (its key differs) or is not a checkpoint.
    """
    if not os.path.exists(path):
        return None
    tensors, meta = read_checkpoint(path)
    for name, value in key.items():
        if meta.get(name) != value:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} belongs to another fit ({name} differs); delete it or pass "
                "another checkpoint path"
            )
    t = {k: v.to(problem.design.device) for k, v in tensors.items()}
    precond = None
    if "precond_beta" in t:
        precond = BlockPreconditioner.build(
            problem.X, t["precond_beta"], t["precond_W"], problem.lam, problem.bias, problem.design.whitening,
            problem.dtype, problem.chunk_size, problem.comm, age=int(t["precond_age"][0]),
        )  # fmt: skip
    if "logits" in t and not problem.comm.distributed:
        return State(t["log_alpha"], AtomState(t["beta"], t["logits"], t["A"], precond)), meta
    state = problem.state(t["log_alpha"].exp(), t["beta"])  # logits recomputed for this rank's rows
    return State(t["log_alpha"], replace(state.atoms, precond=precond)), meta
