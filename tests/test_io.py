"""Save and load heads: bit-exact round trips, refusal on a different embedding, atomic writes."""

import os

import pytest
import torch

from torch_softmix import EMFitter, SoftmaxMixtureHead
from torch_softmix import simulate as sim
from torch_softmix.io import atomic_write_bytes, embedding_fingerprint


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    X = sim.gaussian_design(300, 5, seed=0, dtype=dtype)
    truth = sim.random_mixture(3, 5, norm=2.0, seed=1)
    counts = sim.sample_counts(sim.make_head(X, truth), 10_000, seed=2)
    head = EMFitter(3, random_state=0, max_iter=20).fit(X, counts=counts)
    path = tmp_path / "head.safetensors"
    head.save(path)
    loaded = SoftmaxMixtureHead.load(path, X)
    assert loaded.beta.dtype == dtype
    assert torch.equal(loaded.beta, head.beta) and torch.equal(loaded.log_alpha, head.log_alpha)
    assert torch.equal(loaded.log_probs(), head.log_probs())
    assert loaded.fit_info["n_iter"] == head.fit_info["n_iter"]
    assert loaded.embedding.data_ptr() == X.data_ptr()


def test_load_onto_different_embedding_fails_clearly(tmp_path):
    X = sim.gaussian_design(300, 5, seed=0)
    head = SoftmaxMixtureHead(X, 2)
    path = tmp_path / "h.safetensors"
    head.save(path)
    other = X.clone()
    other[0, 0] += 1e-3
    with pytest.raises(ValueError, match="different embedding"):
        SoftmaxMixtureHead.load(path, other)
    with pytest.raises(ValueError, match="shape"):
        SoftmaxMixtureHead.load(path, X[:, :4])
    with pytest.raises(ValueError, match="bias"):
        SoftmaxMixtureHead.load(path, X, torch.zeros(300))
    assert SoftmaxMixtureHead.load(path, other, check_embedding=False).n_components == 2
    # the same values in another dtype are the same design
    assert SoftmaxMixtureHead.load(path, X.double()).n_components == 2


def test_fingerprint_sees_bias_and_shape():
    X = sim.gaussian_design(100, 4, seed=0)
    assert embedding_fingerprint(X) == embedding_fingerprint(X.clone())
    assert embedding_fingerprint(X) != embedding_fingerprint(X, torch.zeros(100))
    assert embedding_fingerprint(X) != embedding_fingerprint(X[:99])


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    X = sim.gaussian_design(50, 3, seed=0)
    path = tmp_path / "h.safetensors"
    SoftmaxMixtureHead(X, 2).save(path)
    data = path.read_bytes()
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        SoftmaxMixtureHead.load(torn, X)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a torch_softmix head"):
        SoftmaxMixtureHead.load(foreign, X)
    with pytest.raises(FileNotFoundError):
        SoftmaxMixtureHead.load(tmp_path / "missing.safetensors", X)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary left behind
