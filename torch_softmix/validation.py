"""Checks at the public boundary: one function per rule, one wording per mistake.

Every public call (head, data, fitter, Hugging Face helpers) validates its arguments here, so a
mistake is reported the same way wherever it is made: the argument's name, what was wrong, and
how to fix it. Nothing in this module touches more than one chunk of a large tensor at a time.

:data:`Constraint` objects (``Int``, ``Real``, ``OneOf``, ``Check``) let a class declare the
constraints on its parameters once, as scikit-learn's ``_parameter_constraints`` does;
:func:`validate_params` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .kernels import row_chunks


# ---------------------------------------------------------------------- scalars
def check_int(name: str, value: Any, low: int = 1, *, allow_none: bool = False) -> int | None:
    """``value`` as an int ``>= low`` (bools refused); ``None`` passes when ``allow_none``."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        hint = " (a non-negative int)" if low == 0 else ""
        raise ValueError(f"{name} must be an int >= {low}{hint}, got {value!r}")
    return value


def check_number(name: str, value: Any, low: float = 0.0, *, strict: bool = False) -> float:
    """``value`` as a finite float ``>= low`` (``> low`` when ``strict``); bools refused."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        rel = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {rel} {low:g}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_device(name: str, device: Any) -> torch.device | None:
    """A usable ``torch.device`` (or ``None``); CUDA is refused where it is absent."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} {device!r} is not a torch device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={device!r} but CUDA is not available here; use {name}='cpu' or None")
    return dev


def check_compute_dtype(name: str, dtype: Any) -> torch.dtype | None:
    """``None``, float32 or float64: the dtypes parameters and products can be computed in."""
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{name} must be torch.float32 or torch.float64 (the compute dtype; half-precision embeddings are "
            f"read in chunks and computed in float32), got {dtype}"
        )
    return dtype


def check_random_state(name: str, value: Any) -> Any:
    if not (
        value is None or isinstance(value, torch.Generator) or (isinstance(value, int) and not isinstance(value, bool))
    ):
        raise TypeError(f"{name} must be None, an int or a torch.Generator, got {value!r}")
    return value


def make_generator(random_state: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator from a seed: an int seeds it, a generator is used as is, ``None`` draws a fresh seed.

    ``None`` means "not reproducible" everywhere in the library, as in scikit-learn.
    """
    check_random_state("random_state", random_state)
    if isinstance(random_state, torch.Generator):
        return random_state
    gen = torch.Generator()
    if random_state is None:
        gen.seed()
    else:
        gen.manual_seed(int(random_state))
    return gen


# ---------------------------------------------------------------------- tensors
def check_simplex(name: str, value: Any, size: int) -> Tensor:
    """Non-negative weights of length ``size``, not all zero, normalised to the simplex (float64)."""
    w = torch.as_tensor(value, dtype=torch.float64).detach()
    if w.shape != (size,) or not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
        shown = w.flatten().tolist() if w.numel() <= 16 else f"a tensor of shape {tuple(w.shape)}"
        raise ValueError(f"{name} must be finite, non-negative and not all zero, with {size} entries; got {shown}")
    return w / w.sum()


def check_finite(name: str, value: Tensor, hint: str = "") -> Tensor:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values{'; ' + hint if hint else ''}")
    return value


def check_token_ids(tokens: Any, vocab_size: int, name: str = "tokens", device: Any = None) -> Tensor:
    """Integer token ids of any shape in ``[0, vocab_size)``, as int64 (no copy when already int64)."""
    tokens = torch.as_tensor(tokens, device=device)
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise TypeError(
            f"{name} must be an integer tensor of token ids, got dtype {tokens.dtype}; "
            "convert with .long() if they are whole numbers"
        )
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} must lie in [0, {vocab_size}) (one row of the embedding each), but holds id {bad}, "
                f"outside [0, {vocab_size}); were these tokens produced by a different tokenizer or model?"
            )
    return tokens.long()


def check_design(embedding: Any, bias: Any = None) -> tuple[Tensor, Tensor | None]:
    """The shapes and dtypes of a design ``X (p, L)`` and bias ``b (p,)``; returns detached views (no copy).

    Finiteness is checked separately (:func:`check_design_finite`): it reads every row.
    """
    if not isinstance(embedding, Tensor):
        raise TypeError(
            f"embedding must be a torch.Tensor of shape (vocab_size, hidden_size), got {type(embedding).__name__}"
        )
    if embedding.dim() != 2 or embedding.shape[0] < 1 or embedding.shape[1] < 1:
        raise ValueError(
            "embedding must be 2-D (vocab_size, hidden_size) with at least one row and one column, e.g. "
            f"model.lm_head.weight; got shape {tuple(embedding.shape)}"
        )
    if not embedding.dtype.is_floating_point:
        raise TypeError(f"embedding must be a floating tensor, got dtype {embedding.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (embedding.shape[0],):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(
                f"bias must be a tensor of shape ({embedding.shape[0]},) (one per vocabulary row), got {shape}"
            )
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating tensor, got dtype {bias.dtype}")
        bias = bias.detach()
    return embedding.detach(), bias


def check_design_finite(embedding: Tensor, bias: Tensor | None, chunk_size: int | None = None) -> None:
    """Refuse a design with a NaN or infinite entry: one chunked pass, no copy of ``X``."""
    for start, _, Xc in row_chunks(embedding, None, embedding.dtype, chunk_size):  # its own dtype: no overflow
        bad = ~torch.isfinite(Xc).all(dim=1)
        if bool(bad.any()):
            row = start + int(torch.nonzero(bad)[0])
            raise ValueError(
                f"embedding contains NaN or infinite values (first in row {row}); check the model's output layer"
            )
    if bias is not None:
        check_finite("bias", bias, "check the model's output layer")


# ---------------------------------------------------------------------- declared constraints
@dataclass(frozen=True)
class Int:
    low: int = 1
    allow_none: bool = False

    def __call__(self, name: str, value: Any) -> None:
        check_int(name, value, self.low, allow_none=self.allow_none)


@dataclass(frozen=True)
class Real:
    low: float = 0.0

    def __call__(self, name: str, value: Any) -> None:
        check_number(name, value, self.low)


@dataclass(frozen=True)
class OneOf:
    choices: tuple

    def __call__(self, name: str, value: Any) -> None:
        check_choice(name, value, self.choices)


@dataclass(frozen=True)
class Check:
    """Any other rule: ``fn(name, value)`` raises on a bad value."""

    fn: Callable[[str, Any], Any]

    def __call__(self, name: str, value: Any) -> None:
        self.fn(name, value)


Constraint = Int | Real | OneOf | Check


def validate_params(constraints: dict[str, Constraint], owner: Any) -> None:
    """Apply each declared constraint to ``getattr(owner, name)``."""
    for name, rule in constraints.items():
        rule(name, getattr(owner, name))
