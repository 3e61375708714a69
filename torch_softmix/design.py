"""The frozen design: ``X (p, L)`` with its optional bias, validated once, with its cached derived quantities.

A :class:`Design` is what the fit, the starts and the checkpoints see of an output layer. It holds
the tensors by reference (no copy), checks them once (shapes, dtypes and, in one chunked pass, that
every entry is finite), and caches what costs a pass over ``X`` and does not change while ``X`` does
not: the fingerprint that identifies it in files and the whitening used by the starts and the
L-BFGS phase. Build one and reuse it to fit several ``K`` or seeds on the same layer without
recomputing them. :func:`torch_softmix.hf.output_design` returns one for a Hugging Face model, with
the model's identity attached.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .dist import Comm
from .io import embedding_fingerprint
from .moments import Whitening
from .validation import check_design, check_design_finite


class Design:
    """A frozen design.

    Args:
        embedding: ``X (p, L)``, any floating dtype, any device; kept by reference.
        bias: optional ``b (p,)``.
        identity: free-form description of where ``X`` comes from (model name, sizes, logit scale).
        chunk_size: rows per chunk in passes over ``X`` (default automatic).
        validate: check that every entry is finite (one chunked pass). ``False`` skips it.
        comm: a :class:`~torch_softmix.dist.Comm` over several ranks to share the vocabulary among them
            (``Comm.from_env()`` under ``torchrun`` or Lightning Fabric). Each rank then computes on its
            contiguous rows ``X[lo:hi]`` (a view: no copy) and every sum over the vocabulary is all-reduced.
            ``embedding`` is the whole matrix on every rank (as a model loaded on every rank holds it);
            ``full_X`` and ``full_bias`` keep it for the fitted head.
    """

    def __init__(
        self,
        embedding: Tensor,
        bias: Tensor | None = None,
        *,
        identity: dict[str, Any] | None = None,
        chunk_size: int | None = None,
        validate: bool = True,
        comm: Comm | None = None,
    ) -> None:
        self.full_X, self.full_bias = check_design(embedding, bias)
        self.comm = comm if comm is not None else Comm()
        self.lo, self.hi = self.comm.rows(self.full_X.shape[0])
        self.X = self.full_X[self.lo : self.hi]
        self.bias = None if self.full_bias is None else self.full_bias[self.lo : self.hi]
        if validate:
            self._validate(chunk_size)
        self.identity: dict[str, Any] = dict(identity or {})
        self.chunk_size = chunk_size

    def _validate(self, chunk_size: int | None) -> None:
        """Every rank checks its rows; all ranks raise if any row anywhere is not finite."""
        try:
            check_design_finite(self.X, self.bias, chunk_size)
            bad = 0.0
        except ValueError:
            if not self.comm.distributed:
                raise
            bad = 1.0
        if self.comm.distributed:
            flag = self.comm.max(torch.tensor([bad], dtype=torch.float64, device=self.X.device), "validate")
            if float(flag[0]) > 0:
                raise ValueError("embedding or bias contains NaN or infinite values (on some rank's rows)")

    # ------------------------------------------------------------------ sizes
    @property
    def vocab_size(self) -> int:
        """``p``: rows of the whole design (this rank holds ``hi - lo`` of them)."""
        return self.full_X.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.X.shape[1]

    @property
    def device(self) -> torch.device:
        return self.X.device

    @property
    def scale(self) -> float:
        """The model's logit scale (logits are ``scale (X h + b)``); 1 unless the identity says otherwise."""
        return float(self.identity.get("logit_scale", 1.0))

    def __repr__(self) -> str:
        bias = ", bias" if self.bias is not None else ""
        ranks = f", rows {self.lo}:{self.hi} of rank {self.comm.rank}/{self.comm.world_size}" if self.comm.distributed else ""
        return f"Design(p={self.vocab_size}, L={self.hidden_size}, dtype={self.X.dtype}, device={self.device}{bias}{ranks})"

    # ------------------------------------------------------------------ cached
    @cached_property
    def fingerprint(self) -> str:
        """:func:`~torch_softmix.io.embedding_fingerprint` of ``X`` and the bias."""
        return embedding_fingerprint(self.full_X, self.full_bias)

    @cached_property
    def whitening(self) -> Whitening:
        """Mean and inverse square root of the covariance of the rows of ``X`` (one ``O(p L^2)`` pass)."""
        return Whitening.from_design(self.X, self.chunk_size, self.comm)

    @cached_property
    def column_variance(self) -> Tensor:
        """Per-column variance of the rows of ``X``: ``(L,)`` float64."""
        return kernels.column_variance(self.X, self.chunk_size, self.comm)

    def to(self, device: torch.device | str | None) -> Design:
        """The same design on ``device`` (``X`` copied only when it lives elsewhere; caches kept when not)."""
        device = None if device is None else torch.device(device)
        if device is None or device == self.device or (device.type == self.device.type and device.index is None):
            return self
        moved = Design(
            self.full_X.to(device),
            None if self.full_bias is None else self.full_bias.to(device),
            identity=self.identity,
            chunk_size=self.chunk_size,
            validate=False,
            comm=self.comm,
        )
        if "fingerprint" in self.__dict__:
            moved.__dict__["fingerprint"] = self.fingerprint  # device-independent by construction
        return moved


def as_design(embedding_or_design: Any, bias: Tensor | None = None, chunk_size: int | None = None) -> Design:
    """A :class:`Design` from a tensor (validated now) or a design (``bias`` must then be ``None``)."""
    if isinstance(embedding_or_design, Design):
        if bias is not None:
            raise ValueError("bias is part of the Design; do not pass bias= with a Design")
        return embedding_or_design
    return Design(embedding_or_design, bias, chunk_size=chunk_size)
