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


@pytest.mark.parametrize("kind", ["llama", "granite"])
def test_hugging_face_flow_on_cuda(kind, tmp_path):
    """The design card's flow with the model on the GPU: sample next tokens, fit with EMFitter on CUDA, attach
    the head, generate, save and load it back. Granite divides its logits by ``logits_scaling``."""
    from torch_softmix import hf

    from .tiny_models import build_tiny_model

    model, tok = hf.load_model(str(build_tiny_model(kind, tmp_path / "model")))
    model = model.cuda()
    design = hf.output_design(model)
    assert design.X.device.type == "cuda" and design.scale == (0.25 if kind == "granite" else 1.0)
    prompts = ["hello world", "the cat sat on"]
    atoms = hf.true_atoms(model, tok, prompts).double()
    torch.testing.assert_close(torch.log_softmax(design.X.double() @ atoms.T, 0).T.cpu(),
                               hf.next_token_log_probs(model, tok, prompts).cpu(), atol=1e-5, rtol=0)  # fmt: skip
    sample = hf.sample_next_tokens(model, tok, prompts, 50_000, weights=[0.4, 0.6], seed=0)
    head = EMFitter(2, random_state=0, device="cuda").fit(design, counts=sample.counts)
    assert head.beta.device.type == "cuda"
    true_law = sample.true_head(design).log_probs().exp()
    assert float((true_law - head.log_probs().exp()).abs().sum().detach()) < 0.05  # twice the total variation
    hf.attach_head(model, head)
    enc = tok(prompts[0], return_tensors="pt").to("cuda")
    with torch.no_grad():
        logits = model(**enc).logits[0, -1]
    torch.testing.assert_close(torch.log_softmax(logits.double(), 0), head.log_probs().detach().double(), atol=1e-4, rtol=0)
    assert model.generate(**enc, max_new_tokens=3, do_sample=True).shape[1] > enc["input_ids"].shape[1]
    hf.save_attached(model, tmp_path / "head.safetensors")
    hf.detach_head(model)
    back = hf.load_attached(model, tmp_path / "head.safetensors")
    torch.testing.assert_close(back.beta, head.beta)
    hf.detach_head(model)
