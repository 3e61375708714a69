"""Hugging Face integration on tiny random models built from configs and loaded with from_pretrained."""

import pytest
import torch
from scipy.stats import chisquare

transformers = pytest.importorskip("transformers")

from torch_softmix import (  # noqa: E402
    EMFitter,
    SoftmaxMixtureHead,
    hf,  # noqa: E402
)
from torch_softmix import simulate as sim  # noqa: E402

from .tiny_models import SCALED, build_tiny_model  # noqa: E402

PROMPTS = ["hello world", "the cat sat on", "1 2 3 4"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny_model(request, tmp_path_factory):
    folder = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return hf.load_model(str(folder))


def test_design_shares_storage_and_reproduces_logits(tiny_model):
    model, tok = tiny_model
    design = hf.output_design(model)
    assert design.X.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    atoms = hf.true_atoms(model, tok, PROMPTS)
    expected = hf.next_token_log_probs(model, tok, PROMPTS)
    got = torch.log_softmax(atoms.double() @ design.X.double().T, dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_next_token_sampling_matches_model_probabilities(tiny_model, tmp_path):
    model, tok = tiny_model
    sample = hf.sample_next_tokens(model, tok, PROMPTS[:1], 50_000, seed=0, out_dir=tmp_path, shard_size=20_000)
    assert len(sample.shards) == 3 and sample.counts.total == 50_000
    probs = hf.next_token_log_probs(model, tok, PROMPTS[:1])[0].exp().numpy()
    obs = sample.counts.dense().numpy()
    keep = probs * 50_000 > 5  # chi-square on the cells with enough expected counts, the rest pooled
    o = list(obs[keep]) + ([obs[~keep].sum()] if (~keep).any() else [])
    e = list(probs[keep]) + ([probs[~keep].sum()] if (~keep).any() else [])
    e = [x * sum(o) / sum(e) for x in e]
    assert chisquare(o, e).pvalue > 1e-3
    # resumable: a second run reads the shards back and gives the same counts
    again = hf.sample_next_tokens(model, tok, PROMPTS[:1], 50_000, seed=0, out_dir=tmp_path, shard_size=20_000)
    assert torch.equal(again.counts.dense(), sample.counts.dense())
    design = hf.output_design(model)
    from_disk = hf.counts_from_shards(tmp_path, design.X.shape[0], design.fingerprint)
    assert torch.equal(from_disk.dense(), sample.counts.dense())


def test_fit_recovers_the_true_laws_and_hidden_states(tiny_model):
    model, tok = tiny_model
    sample = hf.sample_next_tokens(model, tok, PROMPTS, 200_000, weights=[0.5, 0.3, 0.2], seed=1)
    design = hf.output_design(model)
    true_head = sample.true_head(design)
    oracle = EMFitter(3, init=sample.truth, tol=1e-10).fit(design.X, counts=sample.counts)
    fit = EMFitter(3, n_init=10, random_state=0, tol=1e-10).fit(design.X, counts=sample.counts)
    ev, ev_o = sim.evaluate(fit, true_head), sim.evaluate(oracle, true_head)
    assert ev["tv"] < 0.02 and ev["weight_error"] < 0.03
    assert max(ev["component_kl"]) < 1.5 * max(ev_o["component_kl"]) + 1e-3
    # the true final hidden states are recovered, as well as from the oracle start
    assert min(ev["cosine"]) > 0.97
    assert ev["atom_error_max"] <= 1.1 * ev_o["atom_error_max"]


def test_attach_detach_round_trip_with_generate(tiny_model, tmp_path):
    model, tok = tiny_model
    design = hf.output_design(model)
    enc = tok("hello world", return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
    head = SoftmaxMixtureHead(design.X, 2, design.bias, beta=torch.randn(2, design.X.shape[1]) * 0.1)
    hf.attach_head(model, head)
    with torch.no_grad():
        logits = model(**enc).logits
    torch.testing.assert_close(logits[0, -1], head.log_probs().detach())
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=5, pad_token_id=1, top_k=0)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5 or int(out[0, -1]) == 1
    path = tmp_path / "attached.safetensors"
    hf.save_attached(model, path)
    hf.detach_head(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, before)
    loaded = hf.load_attached(model, path)
    assert torch.equal(loaded.beta, head.beta) and loaded.fit_info["model"]["vocab_size"] == design.X.shape[0]
    with pytest.raises(ValueError, match="already attached"):
        hf.attach_head(model, loaded)
    hf.detach_head(model)


def test_streams_are_written_and_resumable(tiny_model, tmp_path):
    model, tok = tiny_model
    s = hf.sample_streams(model, tok, PROMPTS, n_sequences=6, max_new_tokens=8, batch_size=4, seed=0, out_dir=tmp_path)
    assert len(s.shards) == 2 and 0 < s.counts.total <= 48
    again = hf.sample_streams(
        model, tok, PROMPTS, n_sequences=6, max_new_tokens=8, batch_size=4, seed=0, out_dir=tmp_path
    )
    assert torch.equal(again.counts.dense(), s.counts.dense())
    with pytest.warns(UserWarning, match="misspecified"):
        hf.sample_streams(model, tok, PROMPTS, n_sequences=2, max_new_tokens=2, top_k=5)


def test_softcapping_is_refused(tiny_model):
    model, _ = tiny_model
    model.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(ValueError, match="softcapping"):
            hf.output_design(model)
    finally:
        model.config.final_logit_softcapping = None


def test_shards_from_another_model_are_refused(tiny_model, tmp_path):
    model, tok = tiny_model
    hf.sample_next_tokens(model, tok, PROMPTS[:1], 100, out_dir=tmp_path)
    with pytest.raises(ValueError, match="another model"):
        hf.counts_from_shards(tmp_path, 300, expect_fingerprint="0" * 32)


# ---------------------------------------------------------------------- fixed bugs
def test_shards_of_another_sampling_run_are_refused_not_mixed(tiny_model, tmp_path):
    """Shards drawn with other prompts, weights, temperature or sizes are never read back into a new run."""
    model, tok = tiny_model
    first = hf.sample_next_tokens(model, tok, PROMPTS[:2], 2000, weights=[0.5, 0.5], seed=0, out_dir=tmp_path)
    record = (tmp_path / "sampler.json").read_bytes()
    others = [
        dict(prompts=PROMPTS[1:3], weights=[0.5, 0.5]),
        dict(prompts=PROMPTS[:2], weights=[0.9, 0.1]),
        dict(prompts=PROMPTS[:2], weights=[0.5, 0.5], temperature=0.7),
        dict(prompts=PROMPTS[:2], weights=[0.5, 0.5], n_tokens=3000),
    ]
    for other in others:
        kw = {"n_tokens": 2000, "seed": 0, **other}
        prompts, n = kw.pop("prompts"), kw.pop("n_tokens")
        with pytest.raises(ValueError, match="another sampling run"):
            hf.sample_next_tokens(model, tok, prompts, n, out_dir=tmp_path, **kw)
    assert (tmp_path / "sampler.json").read_bytes() == record  # nothing overwritten
    again = hf.sample_next_tokens(model, tok, PROMPTS[:2], 2000, weights=[0.5, 0.5], seed=0, out_dir=tmp_path)
    assert torch.equal(again.counts.dense(), first.counts.dense())  # the same run still resumes


def test_sampling_leaves_the_global_rng_alone(tiny_model):
    model, tok = tiny_model
    torch.manual_seed(123)
    state = torch.get_rng_state()
    hf.sample_streams(model, tok, PROMPTS, n_sequences=2, max_new_tokens=3, seed=5)
    assert torch.equal(torch.get_rng_state(), state)


def test_save_attached_leaves_the_model_untouched(tiny_model, tmp_path):
    model, tok = tiny_model
    design = hf.output_design(model)
    head = SoftmaxMixtureHead(design.X, 2, design.bias)
    hf.attach_head(model, head)
    try:
        layer = model.get_output_embeddings()
        hf.save_attached(model, tmp_path / "h.safetensors")
        assert model.get_output_embeddings() is layer  # never detached and re-attached
        with pytest.raises(FileNotFoundError):
            hf.save_attached(model, tmp_path / "missing-folder" / "h.safetensors")
        assert model.get_output_embeddings() is layer
    finally:
        hf.detach_head(model)


@pytest.mark.parametrize("kind", sorted(SCALED))
def test_models_that_scale_their_logits(kind, tmp_path):
    """Granite divides its logits by ``logits_scaling``, Cohere multiplies them by ``logit_scale``: the measured
    scale gives true atoms that reproduce the model's own law, and an attached head's law is the model's."""
    model, tok = hf.load_model(str(build_tiny_model(kind, tmp_path)))
    design = hf.output_design(model)
    assert design.scale == SCALED[kind][2]
    atoms = hf.true_atoms(model, tok, PROMPTS, temperature=0.7).double()
    log_pi = torch.log_softmax(design.X.double() @ atoms.T, 0).T
    torch.testing.assert_close(log_pi, hf.next_token_log_probs(model, tok, PROMPTS, temperature=0.7), atol=1e-5, rtol=0)
    head = SoftmaxMixtureHead(design.X, 2, design.bias, alpha=torch.tensor([0.3, 0.7]), beta=atoms[:2])
    hf.attach_head(model, head)
    try:
        with torch.no_grad():
            logits = model(**tok(PROMPTS[0], return_tensors="pt")).logits[0, -1]
        torch.testing.assert_close(torch.log_softmax(logits.double(), 0), head.log_probs().double(), atol=1e-5, rtol=0)
        assert model.generate(**tok(PROMPTS[0], return_tensors="pt"), max_new_tokens=3, do_sample=True).shape[1] > 3
    finally:
        hf.detach_head(model)


class _CappedLlama(transformers.LlamaForCausalLM):
    """A model that soft-caps its logits in its forward without saying so in its config."""

    def forward(self, *args, **kw):
        out = super().forward(*args, **kw)
        out.logits = 5.0 * torch.tanh(out.logits / 5.0)
        return out


class _BypassLlama(transformers.LlamaForCausalLM):
    """A model whose forward reads its output weight directly instead of calling its output layer."""

    def forward(self, input_ids=None, **kw):
        kw.pop("logits_to_keep", None)
        out = self.model(input_ids=input_ids, **kw)
        logits = torch.nn.functional.linear(out.last_hidden_state, self.model.embed_tokens.weight)
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=logits)


def test_models_whose_law_is_not_a_softmax_of_their_output_layer_are_refused(tmp_path):
    folder = build_tiny_model("llama", tmp_path)
    capped = _CappedLlama.from_pretrained(folder)
    with pytest.raises(ValueError, match="not a positive multiple of its output layer"):
        hf.output_design(capped)
    bypass = _BypassLlama.from_pretrained(folder)  # tied embeddings: its law is still softmax(X h)
    design = hf.output_design(bypass)
    layer = bypass.get_output_embeddings()
    with pytest.raises(ValueError, match="does not go through get_output_embeddings"):
        hf.attach_head(bypass, SoftmaxMixtureHead(design.X, 2, beta=torch.randn(2, design.X.shape[1])))
    assert bypass.get_output_embeddings() is layer and not hasattr(bypass, "_softmix_original_output")


def test_bad_prompts_and_missing_model_folders_get_clear_errors(tiny_model, tmp_path):
    model, tok = tiny_model
    with pytest.raises(TypeError, match="wrap it"):
        hf.sample_next_tokens(model, tok, "hello world", 10)  # one string, not a list of prompts
    with pytest.raises(TypeError, match="prompts must be strings"):
        hf.true_atoms(model, tok, ["hello", 3])
    with pytest.raises(ValueError, match="prompts is empty"):
        hf.next_token_log_probs(model, tok, [])
    with pytest.raises(FileNotFoundError, match="no model folder"):
        hf.load_model(str(tmp_path / "not-there"))
