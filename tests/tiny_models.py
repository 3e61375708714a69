"""Tiny random causal LMs built from configs and saved to a folder, so tests use the real loading code
(``from_pretrained(local_dir)``) without any download."""

from pathlib import Path

import torch


def _word_tokenizer(folder: Path) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[EOS]": 1}
    for word in "hello world the cat sat on 1 2 3 4 a b c".split():
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]"
    )
    fast.save_pretrained(folder)


#: Architectures that scale their logits, each with its config's factor: ``kind -> (model_type, settings,
#: logit scale c)`` (the model's logits are ``c lm_head(h)``; Granite divides by its factor, Cohere multiplies).
SCALED = {
    "granite": ("granite", {"logits_scaling": 4.0}, 0.25),
    "cohere": ("cohere", {"logit_scale": 0.5}, 0.5),
}


def build_tiny_model(kind: str, folder: Path) -> Path:
    """A 2-layer random ``llama`` (tied embeddings), ``gpt2`` or one of :data:`SCALED` with a 300-token
    vocabulary, saved in ``folder``."""
    import transformers

    torch.manual_seed(0)
    if kind in SCALED:
        model_type, settings, _ = SCALED[kind]
        cfg = transformers.AutoConfig.for_model(
            model_type, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, eos_token_id=1, pad_token_id=1, bos_token_id=0, **settings,
        )  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            eos_token_id=1,
            pad_token_id=1,
            bos_token_id=0,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=300,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            eos_token_id=1,
            pad_token_id=1,
            bos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # next-token laws less flat than at initialisation
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(folder)
    _word_tokenizer(folder)
    return folder
