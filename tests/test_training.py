"""The conditional head on tiny random causal LMs: attach + generate, and head-only training with Lightning."""

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
L = pytest.importorskip("lightning")

from torch_softmix import MixtureOfSoftmaxesHead, hf  # noqa: E402
from torch_softmix.training import (  # noqa: E402
    FrozenLMHead,
    HeadCheckpoint,
    TokenBlocks,
    final_hidden_states,
    next_token_labels,
    split_files,
)

from .tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny_model(request, tmp_path_factory):
    folder = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return hf.load_model(str(folder))


def test_one_component_head_reproduces_the_model_and_its_greedy_generation(tiny_model, tmp_path):
    model, tok = tiny_model
    enc = tok("the cat sat on", return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=1)
    design = hf.output_design(model)
    hf.attach_head(model, MixtureOfSoftmaxesHead(design.X, 1, design.bias))
    try:
        with torch.no_grad():
            after = model(**enc).logits
        torch.testing.assert_close(after, torch.log_softmax(before, -1), rtol=0, atol=1e-5)
        assert torch.equal(model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=1), greedy)
    finally:
        hf.detach_head(model)


def test_a_conditional_head_gives_each_position_its_law_and_survives_save_and_load(tiny_model, tmp_path):
    model, tok = tiny_model
    design = hf.output_design(model)
    head = MixtureOfSoftmaxesHead(design.X, 3, design.bias, rank=2).perturb_(0.5, torch.Generator().manual_seed(0))
    enc = tok("hello world the cat", return_tensors="pt")
    hf.attach_head(model, head)
    try:
        with torch.no_grad():
            logits = model(**enc).logits[0]
        assert not torch.allclose(logits[-1], logits[-2])  # a law per position, unlike SoftmaxMixtureHead
        torch.manual_seed(0)
        out = model.generate(**enc, do_sample=True, max_new_tokens=4, pad_token_id=1, top_k=0)
        assert out.shape[1] <= enc["input_ids"].shape[1] + 4
        hf.save_attached(model, tmp_path / "mos.safetensors")
    finally:
        hf.detach_head(model)
    loaded = hf.load_attached(model, tmp_path / "mos.safetensors")
    try:
        assert isinstance(loaded, MixtureOfSoftmaxesHead)
        with torch.no_grad():
            torch.testing.assert_close(model(**enc).logits[0], logits)
    finally:
        hf.detach_head(model)


def _write_corpus(folder, n_files, seed):
    """Files of short word patterns: a structure the random tiny model does not know."""
    rng = random.Random(seed)
    patterns = ["the cat sat on a", "hello world 1 2 3 4", "a b c the cat", "1 2 3 hello world"]
    paths = []
    for i in range(n_files):
        words = " ".join(rng.choice(patterns) for _ in range(40))
        path = folder / f"doc{i}.txt"
        path.write_text(words)
        paths.append(path)
    return paths


def test_labels_follow_the_inputs_and_skip_padding():
    ids = torch.tensor([[5, 6, 7, 1]])
    labels = next_token_labels(ids, torch.tensor([[1, 1, 1, 0]]))
    assert labels.tolist() == [[6, 7, -100, -100]]


def test_split_is_by_file_and_reproducible(tmp_path):
    paths = _write_corpus(tmp_path, 10, 0)
    train, val = split_files(paths, 0.2, seed=3)
    assert len(val) == 2 and not set(train) & set(val) and split_files(paths, 0.2, seed=3) == (train, val)
    with pytest.raises(ValueError, match="val_fraction"):
        split_files(paths, 1.5)


def test_lightning_training_lowers_held_out_loss_and_saves_the_head_only(tiny_model, tmp_path):
    model, tok = tiny_model
    train, val = split_files(_write_corpus(tmp_path, 12, 1), 0.25, seed=0)
    data = TokenBlocks(train, val, tokenizer=tok, block_size=16, batch_size=8)
    design = hf.output_design(model)
    head = MixtureOfSoftmaxesHead(design.X, 2, design.bias, rank=4).perturb_(0.05, torch.Generator().manual_seed(0))
    module = FrozenLMHead(model, head, lr=0.03)
    assert not any(p.requires_grad for p in model.parameters())
    trainer_kw = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    before = L.Trainer(**trainer_kw).validate(module, datamodule=data, verbose=False)[0]["val_loss"]
    trainer = L.Trainer(max_steps=40, default_root_dir=tmp_path, callbacks=[HeadCheckpoint(tmp_path / "head")],
                        val_check_interval=20, check_val_every_n_epoch=None, **trainer_kw)
    trainer.fit(module, datamodule=data)
    after = float(trainer.callback_metrics["val_loss"])
    assert after < before - 0.2, (before, after)
    # the Lightning checkpoint holds the head's parameters only, not the frozen backbone
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    keys = torch.load(ckpt, weights_only=False)["state_dict"].keys()
    assert keys and all(k.startswith("head.") for k in keys)
    # the saved head loads with the library alone and gives the same outputs
    loaded = MixtureOfSoftmaxesHead.from_pretrained(tmp_path / "head" / "last", design.X, design.bias)
    ids = data.blocks["val"][:2]
    hidden = final_hidden_states(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(hidden), head(hidden), rtol=0, atol=0)
    assert (tmp_path / "head" / "best" / "mos_head.safetensors").is_file()
