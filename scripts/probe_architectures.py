"""Which Hugging Face causal-LM architectures does ``torch_softmix.hf`` read right? One tiny random model per
``model_type`` (built from a config, no download): the measured logit scale ``c`` of ``hf.output_design`` and
the largest error of ``log_softmax(c (X h + b))`` against the model's own next-token log-law on probe tokens,
then an attached head's law against the model's logits after the swap.

    python scripts/probe_architectures.py [model_type[:setting=value] ...]   # e.g. granite:logits_scaling=8
"""

from __future__ import annotations

import sys
import warnings

import torch
import transformers

from torch_softmix import SoftmaxMixtureHead, hf

TYPES = ("llama gpt2 mistral qwen2 qwen3 phi phi3 gpt_neox opt bloom falcon gemma gemma2 gemma3_text cohere granite "
         "olmo olmo2 stablelm gptj codegen mpt starcoder2 mixtral gpt_bigcode xglm mamba nemotron helium glm exaone4 "
         "smollm3 granitemoe biogpt persimmon recurrent_gemma jamba olmoe arcee ministral seed_oss lfm2 "
         "hunyuan_v1_dense falcon_h1 bitnet apertus granite:logits_scaling=8 granitemoe:logits_scaling=16 "
         "falcon_h1:lm_head_multiplier=2").split()  # fmt: skip
SIZES = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=1, bos_token_id=0, eos_token_id=1)  # fmt: skip


def probe(spec: str) -> str:
    model_type, *settings = spec.split(":")
    extra = {k: float(v) for k, v in (kv.split("=") for kv in settings)}
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **SIZES, **extra)
        for name, size in (("head_dim", 8), ("rotary_dim", 4)):  # per-head sizes that fit hidden_size 32
            if getattr(cfg, name, None) is not None:
                setattr(cfg, name, size)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            model(input_ids=torch.arange(4)[None], use_cache=False)
    except Exception as err:  # a config these generic sizes do not fit: not the library's concern
        return f"not built or not run with these sizes ({type(err).__name__})"
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # laws less flat than at initialisation
    try:
        design = hf.output_design(model)
    except ValueError as err:
        return f"refused: {str(err)[:90]}"
    h, logits = hf._probe(model)
    law = design.X.double() @ (h.double() * design.scale)
    if design.bias is not None:
        law = law + design.bias.double()
    err = (torch.log_softmax(law, 0) - torch.log_softmax(logits, 0)).abs().max().item()
    head = SoftmaxMixtureHead(design.X, 2, design.bias, beta=torch.randn(2, design.X.shape[1]))
    try:
        hf.attach_head(model, head)
        _, attached = hf._probe(model)
        hf.detach_head(model)
        err_head = (torch.log_softmax(attached, 0) - head.log_probs().double()).abs().max().item()
        head_note = f"attached head's law error {err_head:.1e}"
    except ValueError as err:
        head_note = f"attach refused: {str(err)[:60]}"
    return f"scale {design.scale:g}, law error {err:.1e}, {head_note}"


def main() -> None:
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    for t in sys.argv[1:] or TYPES:
        print(f"{t:34s} {probe(t)}", flush=True)


if __name__ == "__main__":
    main()
