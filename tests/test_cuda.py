"""CUDA: the same code on a GPU gives the CPU's answer (skipped without a GPU)."""

import pytest
import torch

from torch_softmix import EMFitter, SoftmaxMixtureHead
from torch_softmix import simulate as sim

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_fit_on_cuda_matches_cpu():
    X = sim.gaussian_design(2000, 8, seed=0, dtype=torch.float64)
    truth = sim.random_mixture(3, 8, norm=2.0, seed=1)
    counts = sim.sample_counts(sim.make_head(X, truth), 100_000, seed=2)
    cpu = EMFitter(3, init=truth, tol=1e-10).fit(X, counts=counts)
    gpu = EMFitter(3, init=truth, tol=1e-10, device="cuda").fit(X, counts=counts)
    assert gpu.beta.device.type == "cuda"
    torch.testing.assert_close(gpu.beta.cpu(), cpu.beta, rtol=1e-6, atol=1e-6)


def test_float32_fit_on_cuda_and_save(tmp_path):
    X = sim.gaussian_design(2000, 8, seed=3).cuda()
    truth = sim.random_mixture(2, 8, norm=2.0, seed=4)
    counts = sim.sample_counts(sim.make_head(X.cpu(), truth), 50_000, seed=5).cuda()
    head = EMFitter(2, random_state=0, n_init=2).fit(X, counts=counts)
    head.save(tmp_path / "h.safetensors")
    back = SoftmaxMixtureHead.load(tmp_path / "h.safetensors", X)
    assert torch.equal(back.beta, head.beta)
    tokens = head.sample(1000, generator=torch.Generator(device="cuda").manual_seed(0))
    assert tokens.device.type == "cuda"


def test_polish_on_cuda_matches_cpu():
    X = sim.gaussian_design(2000, 8, seed=6, dtype=torch.float64)
    truth = sim.random_mixture(3, 8, norm=2.0, seed=7)
    counts = sim.sample_counts(sim.make_head(X, truth), 100_000, seed=8)
    start = sim.perturbed_start(truth, 0.3, seed=9)
    cpu = EMFitter(3, init=start, max_iter=2, polish_iter=300, tol=1e-13)
    gpu = EMFitter(3, init=start, max_iter=2, polish_iter=300, tol=1e-13, device="cuda")
    cpu.fit(X, counts=counts)
    gpu.fit(X, counts=counts)
    assert gpu.polish_["kept"] and gpu.head_.beta.device.type == "cuda"
    assert abs(gpu.objective_ - cpu.objective_) < 1e-9
    torch.testing.assert_close(gpu.head_.beta.cpu(), cpu.head_.beta, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("task", ["given", "default"])
def test_vocabulary_parallel_fit_on_cuda_matches_one_process(task, tmp_path):
    """Two ranks share the vocabulary of a CUDA fit: NCCL when there are two GPUs, else gloo over CUDA tensors."""
    from torch_softmix.dist import Comm

    from . import dist_worker as dw

    world = 2
    backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    ref = dw.run_tasks(Comm(), [task], {"device": "cuda"})[task]
    results = dw.launch(world, [task], {"out_dir": str(tmp_path), "device": "cuda", "backend": backend})
    assert all(r is not None for r in results), f"a rank did not finish ({backend})"
    assert ref["device"] == "cuda"
    for rank, res in enumerate(results):
        got = res[task]
        assert got["device"] == "cuda" and got["init_names"] == ref["init_names"]
        torch.testing.assert_close(got["beta"], ref["beta"], rtol=1e-6, atol=1e-9, msg=f"{backend} rank {rank}")
        assert got["objective"] == pytest.approx(ref["objective"], rel=1e-9)
