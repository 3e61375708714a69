"""Vocabulary parallelism on ``torch.distributed``: which rows a rank holds, and the collectives of a fit.

Each rank holds a contiguous slice of the vocabulary: rows ``[lo, hi)`` of ``X``, of the bias and of the
counts. Weights and atoms are replicated. Every sum over the vocabulary becomes a local sum followed by an
all-reduce, and every log-normaliser a local max and sum of exponentials followed by two all-reduces, as
in Megatron-LM's vocabulary-parallel cross-entropy. What crosses the wire has the size of the parameters
(``K``, ``K x L``, ``L x L``), never of the vocabulary.

:class:`Comm` is that set of collectives. ``Comm()`` (no process group, one rank) makes every reduction
the identity, so the single-process fit is the same code. ``Comm.from_env()`` uses the default process
group that ``torchrun`` or Lightning Fabric set up (or initialises one from ``torchrun``'s environment).
Collectives are counted (``calls``, ``bytes``) so the cost per iteration can be stated and tested.

A collective that fails (a peer died or stopped answering within the process group's timeout) raises
:class:`RankFailure`, naming the ranks that stopped reporting progress through the store.
"""

from __future__ import annotations

import datetime
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch import Tensor

#: Default timeout of the collectives of a fit (seconds); ``SOFTMIX_DIST_TIMEOUT`` overrides it.
DEFAULT_TIMEOUT = 300.0


class RankFailure(RuntimeError):
    """A collective failed because another rank died or stopped answering."""


def row_range(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous rows ``[lo, hi)`` of rank ``rank``: the first ``n_rows % world_size`` ranks get one more."""
    base, extra = divmod(n_rows, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass
class Comm:
    """The collectives of a vocabulary-parallel fit over ``group`` (``None`` and one rank: no communication)."""

    group: object | None = None
    rank: int = 0
    world_size: int = 1
    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)

    @classmethod
    def from_env(cls, timeout: float | None = None) -> Comm:
        """The default process group, initialised from ``torchrun``'s environment when needed (gloo on CPU,
        NCCL on CUDA); a single-process ``Comm`` when there is no distributed environment."""
        if not tdist.is_available():
            return cls()
        if not tdist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                return cls()
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            seconds = timeout if timeout is not None else float(os.environ.get("SOFTMIX_DIST_TIMEOUT", DEFAULT_TIMEOUT))
            tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
            _OWNED[0] = True
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if tdist.get_world_size() == 1:
            return cls()
        return cls(tdist.group.WORLD, tdist.get_rank(), tdist.get_world_size())

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def rows(self, n_rows: int) -> tuple[int, int]:
        """This rank's rows of an ``n_rows`` vocabulary."""
        return row_range(n_rows, self.rank, self.world_size)

    def reset_counts(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    # ------------------------------------------------------------------ collectives
    def _call(self, name: str, nbytes: int, fn) -> None:
        """Run one collective ``fn()``, counting it; a failure becomes a :class:`RankFailure`."""
        self.calls[name] += 1
        self.bytes[name] += nbytes
        try:
            fn()
        except RuntimeError as err:
            raise self.failure(name, err) from err

    def _reduce(self, t: Tensor, op, name: str) -> Tensor:
        if self.distributed:
            self._call(name, t.numel() * t.element_size(), lambda: tdist.all_reduce(t, op=op, group=self.group))
        return t

    def sum(self, t: Tensor, name: str = "sum") -> Tensor:
        """All-reduce by sum (in place on a contiguous tensor; returns it)."""
        return self._reduce(t.contiguous(), tdist.ReduceOp.SUM, name)

    def max(self, t: Tensor, name: str = "max") -> Tensor:
        return self._reduce(t.contiguous(), tdist.ReduceOp.MAX, name)

    def logsumexp(self, local: Tensor, dim: int = 0, name: str = "logsumexp") -> Tensor:
        """``logsumexp`` over the vocabulary axis ``dim`` of a row-sharded tensor: a max, then a sum, all-reduced
        (on one rank the same two steps, no communication). A max and a sum of exponentials rather than
        ``torch.logsumexp``: on CPU that (and ``amax``) takes 3-8 times as long along the strided vocabulary
        axis of a ``(p, K)`` tensor, and the M-step's line search evaluates this at every trial."""
        m = local.max(dim=dim).values if local.shape[dim] else torch.full_like(local.sum(dim), -torch.inf)
        m = self.max(m.clone(), name + ":max")
        safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = self.sum(torch.exp(local - safe.unsqueeze(dim)).sum(dim), name + ":sum")
        return torch.log(s) + safe

    def gather(self, t: Tensor, name: str = "gather") -> list[Tensor]:
        """Every rank's tensor (first dimension may differ between ranks; padded on the wire)."""
        if not self.distributed:
            return [t]
        n = self.sum(torch.zeros(self.world_size, dtype=torch.int64, device=t.device).index_fill_(
            0, torch.tensor([self.rank], device=t.device), t.shape[0]), name + ":sizes")  # fmt: skip
        width = int(n.max())
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        nbytes = padded.numel() * padded.element_size() * self.world_size
        self._call(name, nbytes, lambda: tdist.all_gather(out, padded, group=self.group))
        return [o[: int(k)] for o, k in zip(out, n)]

    def broadcast(self, t: Tensor, src: int = 0, name: str = "broadcast") -> Tensor:
        """``t`` from rank ``src`` on every rank (in place on a contiguous tensor; returns it)."""
        if self.distributed:
            t = t.contiguous()
            self._call(name, t.numel() * t.element_size(), lambda: tdist.broadcast(t, src=src, group=self.group))
        return t

    def broadcast_object(self, obj):
        """``obj`` from rank 0 on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        try:
            tdist.broadcast_object_list(box, src=0, group=self.group)
        except RuntimeError as err:
            raise self.failure("broadcast", err) from err
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            try:
                tdist.barrier(group=self.group)
            except RuntimeError as err:
                raise self.failure("barrier", err) from err

    # ------------------------------------------------------------------ failures
    def failure(self, what: str, err: Exception, wait: float = 2.0) -> RankFailure:
        """A :class:`RankFailure` naming the ranks that are gone.

        Every surviving rank hits the failed collective too and marks itself alive in the process group's
        store; after ``wait`` seconds the ranks without a mark are named. If the store is unreachable, rank 0
        (which hosts it) is the one gone.
        """
        store, gone = _store(), None
        if store is not None:
            try:
                store.set(f"softmix/alive/{self.rank}", "1")
                time.sleep(wait)
                gone = [r for r in range(self.world_size) if not store.check([f"softmix/alive/{r}"])]
            except Exception:  # noqa: BLE001 - rank 0 hosts the store: if it died, the store died with it
                gone = [0] if self.rank != 0 else None
        who = f"rank {gone[0]}" if gone and len(gone) == 1 else (f"ranks {gone}" if gone else "another rank")
        return RankFailure(
            f"rank {self.rank}: the collective {what!r} failed because {who} died or stopped answering "
            f"(process group timeout or lost connection): {err}. Resume from the last checkpoint, with the same "
            "or another number of ranks."
        )


_OWNED = [False]  # whether Comm.from_env initialised the default process group (then shutdown() ends it)


def shutdown() -> None:
    """End the default process group if :meth:`Comm.from_env` started it. Called before a process that
    ran under ``torchrun`` exits, so that the backend's threads stop before the interpreter does (gloo may
    otherwise abort the exiting process: "terminate called without an active exception")."""
    if _OWNED[0] and tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _OWNED[0] = False


def _store():
    """The default process group's store, if there is one."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no process group
        return None
