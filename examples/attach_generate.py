"""Attach a fitted head to SmolLM2 as its output layer and generate from it.

Fits a K = 2 mixture to next tokens of two prompts, attaches it with ``attach_head`` (the model's
logits become the mixture's ``log pi`` at every position, so ``generate()`` samples from the head:
the same law whatever the context), generates a few continuations, saves the attached head with
``save_attached`` (head file plus the model's identity), detaches it (the original ``lm_head`` is
back, its logits identical to before) and loads it onto the model again with ``load_attached``.
About 55 s on a 2-core CPU.

    python examples/attach_generate.py [--n-tokens 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time
from pathlib import Path

import torch

from torch_softmix import EMFitter, hf, tune_memory_allocator

PROMPTS = ["The capital of France is", "Once upon a time, there was a little"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-tokens", type=int, default=100_000)
    ap.add_argument("--polish-iter", type=int, default=2000)
    n_moves = inspect.signature(EMFitter).parameters["n_moves"].default  # the fitter's own default
    ap.add_argument("--n-moves", type=int, default=n_moves, help="split-and-merge rounds (EMFitter n_moves; 0: none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tune_memory_allocator()  # keep freed memory in the process: passes over the vocabulary stop page-faulting

    t0 = time.perf_counter()
    model, tok = hf.load_smollm2()
    design = hf.output_design(model)
    sample = hf.sample_next_tokens(model, tok, PROMPTS, args.n_tokens, weights=[0.6, 0.4], seed=args.seed)
    head = EMFitter(2, random_state=args.seed, polish_iter=args.polish_iter, n_moves=args.n_moves).fit(design.X, counts=sample.counts, bias=design.bias)
    print(f"fitted K=2 on {args.n_tokens:,} tokens; weights {[round(float(a), 3) for a in head.alpha]} "
          f"({time.perf_counter() - t0:.1f} s)")

    inputs = tok("Tell me a story:", return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits

    hf.attach_head(model, head)
    torch.manual_seed(args.seed)
    out = model.generate(**inputs, do_sample=True, max_new_tokens=12, num_return_sequences=3, top_k=0, top_p=1.0)
    print("\ngenerated with the mixture as output layer (each token drawn from pi, context ignored):")
    for seq in out:
        print("  ", repr(tok.decode(seq[inputs["input_ids"].shape[1]:])))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "head.safetensors"
        hf.save_attached(model, path)
        hf.detach_head(model)
        with torch.no_grad():
            after = model(**inputs).logits
        print(f"\ndetached: original logits restored exactly = {torch.equal(before, after)}")
        loaded = hf.load_attached(model, path)
        print(f"re-attached from {path.name}: parameters bit-identical = "
              f"{torch.equal(loaded.beta, head.beta) and torch.equal(loaded.log_alpha, head.log_alpha)}")
        hf.detach_head(model)
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
