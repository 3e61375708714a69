import pytest
import torch

from torch_softmix import simulate as sim


@pytest.fixture
def small_problem():
    """A small Gaussian design with a known 3-component truth (float64)."""
    X = sim.gaussian_design(400, 6, seed=0, dtype=torch.float64)
    truth = sim.random_mixture(3, 6, norm=1.5, separation=1.0, seed=1)
    return X, truth
