"""A conditional mixture-of-softmaxes head on SmolLM2: fit, build, train with Lightning, save, load, attach, generate.

1. Fit an unconditional K-component mixture (EM) to the model's own next-token samples at contexts of the
   training text.
2. Build a ``MixtureOfSoftmaxesHead`` from the fit (``from_fitted``: gate bias from the weights, offsets
   from the centred atoms).
3. Train the head only, SmolLM2 frozen, with a Lightning ``Trainer`` on Python standard-library sources
   (split by file); the ``HeadCheckpoint`` callback saves the head (safetensors + config) after each
   validation.
4. Load the saved head with the library alone, attach it to the model and generate: each position now
   gets its own law.

    python examples/mos_head.py [--K 4] [--train-tokens 20000] [--max-steps 40] [--out mos_head_run]
"""

from __future__ import annotations

import argparse
import inspect
import sysconfig
import tempfile
from pathlib import Path

import lightning as L
import torch

from torch_softmix import EMFitter, MixtureOfSoftmaxesHead, TokenCounts, hf
from torch_softmix.training import (
    FrozenLMHead,
    HeadCheckpoint,
    TokenBlocks,
    final_hidden_states,
    sample_at_states,
    split_files,
)


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.glob("*.py"))]  # the top-level modules: enough text for an example


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--train-tokens", type=int, default=20_000)
    ap.add_argument("--val-tokens", type=int, default=4_000)
    ap.add_argument("--em-tokens", type=int, default=50_000)
    ap.add_argument("--polish-iter", type=int, default=2000)
    n_moves = inspect.signature(EMFitter).parameters["n_moves"].default  # the fitter's own default
    ap.add_argument("--n-moves", type=int, default=n_moves, help="split-and-merge rounds (EMFitter n_moves; 0: none)")
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--offset-scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="where the head is saved (default: a temporary folder)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mos_head_"))

    model, tok = hf.load_smollm2()
    design = hf.output_design(model)
    train_files, val_files = split_files(stdlib_sources(), 0.2, seed=args.seed)
    data = TokenBlocks(train_files, val_files, tokenizer=tok, block_size=128, batch_size=4,
                       max_train_tokens=args.train_tokens, max_val_tokens=args.val_tokens, seed=args.seed)
    data.setup()

    # 1. the unconditional fit, on the model's own samples at training contexts
    hidden = final_hidden_states(model, data.blocks["train"][:16])
    gen = torch.Generator().manual_seed(args.seed)
    tokens = sample_at_states(design.X, hidden, args.em_tokens, design.bias, generator=gen)
    counts = TokenCounts.from_tokens(tokens, design.X.shape[0])
    fitted = EMFitter(args.K, random_state=args.seed, polish_iter=args.polish_iter, n_moves=args.n_moves).fit(
        design.X, counts=counts, bias=design.bias
    )
    print(f"EM fit: K={args.K}, weights {[round(float(a), 3) for a in fitted.alpha]}")

    # 2. the conditional head, warm-started from the fit; 3. train it with Lightning, backbone frozen
    head = MixtureOfSoftmaxesHead.from_fitted(fitted, rank=8, offset_scale=args.offset_scale, generator=gen)
    module = FrozenLMHead(model, head, lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_steps=args.max_steps, val_check_interval=max(1, args.max_steps // 2),
                        check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[HeadCheckpoint(out)])
    start = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(
        module, datamodule=data, verbose=False)[0]["val_loss"]
    trainer.fit(module, datamodule=data)
    end = float(trainer.callback_metrics["val_loss"])
    print(f"held-out loss: {start:.4f} -> {end:.4f} nats/token after {trainer.global_step} steps; head saved in {out}")

    # 4. load with the library alone, attach, generate
    loaded = MixtureOfSoftmaxesHead.from_pretrained(out / "last", design.X, design.bias)
    same = torch.equal(loaded(hidden[:1]), head(hidden[:1]))
    print(f"loaded from {out / 'last'}: outputs identical = {same}")
    hf.attach_head(model, loaded)
    inputs = tok("def read_config(path):\n    ", return_tensors="pt")
    torch.manual_seed(args.seed)
    generated = model.generate(**inputs, do_sample=True, max_new_tokens=16, top_k=0, top_p=1.0)
    print("generated with the conditional head:", repr(tok.decode(generated[0, inputs["input_ids"].shape[1]:])))
    hf.detach_head(model)


if __name__ == "__main__":
    main()
