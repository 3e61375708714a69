"""Tokens -> counts: sufficient statistics and validation."""

import pytest
import torch

from torch_softmix import TokenCounts
from torch_softmix.data import as_counts


def test_counts_from_tokens_and_shards_add_up():
    tokens = torch.tensor([3, 1, 3, 0, 3, 9])
    c = TokenCounts.from_tokens(tokens, 10)
    assert c.support.tolist() == [0, 1, 3, 9] and c.values.tolist() == [1, 1, 3, 1]
    assert c.total == 6 and c.n_distinct == 4
    parts = TokenCounts.from_tokens([tokens[:2], tokens[2:]], 10)
    assert torch.equal(parts.dense(), c.dense())
    both = TokenCounts.from_tokens(tokens[:2], 10) + TokenCounts.from_tokens(tokens[2:], 10)
    assert torch.equal(both.dense(), c.dense())
    assert torch.equal(TokenCounts.from_dense(torch.bincount(tokens, minlength=10)).dense(), c.dense())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"tokens": torch.tensor([0, 10])}, ValueError, r"outside \[0, 10\)"),
        ({"tokens": torch.tensor([-1, 2])}, ValueError, "id -1"),
        ({"tokens": torch.tensor([0.0, 1.0])}, TypeError, "integer tensor"),
        ({"counts": torch.ones(9)}, ValueError, "length 9"),
        ({"counts": -torch.ones(10)}, ValueError, "non-negative"),
        ({"counts": torch.full((10,), float("nan"))}, ValueError, "NaN"),
        ({"counts": torch.zeros(10)}, ValueError, "empty"),
        ({"tokens": torch.zeros(0, dtype=torch.long)}, ValueError, "empty"),
        ({}, ValueError, "exactly one"),
        ({"tokens": torch.tensor([1]), "counts": torch.ones(10)}, ValueError, "exactly one"),
    ],
)
def test_bad_data_is_refused_clearly(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        as_counts(kwargs.get("tokens"), kwargs.get("counts"), 10)
