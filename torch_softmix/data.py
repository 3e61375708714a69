"""Tokens -> counts: the sufficient statistics of a softmax mixture (docs/MATH.md §2).

The log-likelihood depends on a token stream ``y_1..y_N`` only through the counts
``n_j = #{i : y_i = j}``. :class:`TokenCounts` keeps them sparsely (the support and the
counts on it), adds across shards, and is where token ids and counts are validated, once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .validation import check_int, check_token_ids

#: Tokens are counted this many at a time, so a huge stream needs no huge temporary.
COUNT_CHUNK = 1 << 24


def _check_vocab_size(vocab_size: int) -> int:
    return check_int("vocab_size", vocab_size)


@dataclass(frozen=True)
class TokenCounts:
    """Counts of token ids over a vocabulary of ``vocab_size`` tokens, stored on their support.

    Attributes:
        support: ``(S,)`` int64, the sorted token ids with a positive count.
        values: ``(S,)`` float64, their counts ``n_j > 0`` (integers for sampled tokens; any
            non-negative weights are allowed).
        vocab_size: ``p``, the number of rows of the design.
    """

    support: Tensor
    values: Tensor
    vocab_size: int

    @property
    def total(self) -> float:
        """``N = sum_j n_j``."""
        return float(self.values.sum())

    @property
    def n_distinct(self) -> int:
        """``|S|``, the number of distinct tokens seen."""
        return int(self.support.numel())

    @property
    def device(self) -> torch.device:
        return self.support.device

    def to(self, device: torch.device | str | None) -> TokenCounts:
        """The same counts on ``device``."""
        if device is None:
            return self
        return TokenCounts(self.support.to(device), self.values.to(device), self.vocab_size)

    def rows(self, lo: int, hi: int) -> TokenCounts:
        """The counts of tokens ``[lo, hi)``, renumbered from 0 (a rank's share of a row-sharded vocabulary)."""
        keep = (self.support >= lo) & (self.support < hi)
        return TokenCounts(self.support[keep] - lo, self.values[keep], hi - lo)

    def dense(self) -> Tensor:
        """The ``(p,)`` float64 vector of counts."""
        out = torch.zeros(self.vocab_size, dtype=torch.float64, device=self.device)
        out[self.support] = self.values
        return out

    def __add__(self, other: TokenCounts) -> TokenCounts:
        if not isinstance(other, TokenCounts):
            return NotImplemented
        if other.vocab_size != self.vocab_size:
            raise ValueError(
                f"cannot add counts over different vocabularies ({self.vocab_size} vs {other.vocab_size} tokens)"
            )
        return TokenCounts.from_dense(self.dense() + other.to(self.device).dense())

    @classmethod
    def from_dense(cls, counts: Tensor, vocab_size: int | None = None) -> TokenCounts:
        """From a ``(p,)`` vector of non-negative counts (any real or integer dtype)."""
        counts = torch.as_tensor(counts)
        if counts.dim() != 1:
            raise ValueError(
                "counts must be a 1-D tensor of length vocab_size (one count per token), "
                f"got shape {tuple(counts.shape)}"
            )
        if vocab_size is not None and counts.numel() != _check_vocab_size(vocab_size):
            raise ValueError(
                f"counts has length {counts.numel()} but the embedding has {vocab_size} rows; "
                "pass one count per vocabulary token (torch.bincount(tokens, minlength=vocab_size))"
            )
        if counts.dtype == torch.bool or counts.is_complex():
            raise TypeError(f"counts must be an integer or floating tensor, got dtype {counts.dtype}")
        values = counts.to(torch.float64)
        if not torch.isfinite(values).all():
            raise ValueError("counts contains NaN or infinite values; counts must be finite and non-negative")
        if (values < 0).any():
            j = int(torch.nonzero(values < 0)[0])
            raise ValueError(f"counts must be non-negative, but counts[{j}] = {values[j].item()}")
        support = torch.nonzero(values > 0).flatten()
        return cls(support, values[support], int(counts.numel()))

    @classmethod
    def from_tokens(cls, tokens: Tensor | Iterable[Tensor], vocab_size: int) -> TokenCounts:
        """Count token ids in ``[0, vocab_size)``: one tensor of any shape, or an iterable of shards."""
        _check_vocab_size(vocab_size)
        shards = [tokens] if isinstance(tokens, Tensor) else tokens
        dense = None
        for shard in shards:
            flat = torch.as_tensor(shard).reshape(-1)
            if dense is None:
                dense = torch.zeros(vocab_size, dtype=torch.int64, device=flat.device)
            check_token_ids(flat[:0], vocab_size)  # the dtype, even of an empty shard
            for start in range(0, flat.numel(), COUNT_CHUNK):
                part = check_token_ids(flat[start : start + COUNT_CHUNK], vocab_size)
                dense += torch.bincount(part, minlength=vocab_size).to(dense.device)
        if dense is None:
            raise ValueError("tokens is empty: pass at least one token id")
        return cls.from_dense(dense)


def as_counts(
    tokens: Tensor | Iterable[Tensor] | None, counts: Tensor | TokenCounts | None, vocab_size: int
) -> TokenCounts:
    """Validate the data arguments of a public call and return :class:`TokenCounts` with ``N > 0``."""
    if (tokens is None) == (counts is None):
        raise ValueError("pass exactly one of tokens= (token ids) or counts= (one count per vocabulary token)")
    if tokens is not None:
        out = TokenCounts.from_tokens(tokens, vocab_size)
    elif isinstance(counts, TokenCounts):
        if counts.vocab_size != vocab_size:
            raise ValueError(f"counts are over {counts.vocab_size} tokens but the embedding has {vocab_size} rows")
        out = counts
    else:
        out = TokenCounts.from_dense(counts, vocab_size)
    if out.total <= 0:
        raise ValueError("the data are empty: all counts are zero; pass at least one token")
    return out
