"""Free-running token streams: sample with ``generate``, write shards, fit a mixture to their counts.

SmolLM2-135M-Instruct continues a few prompts with full-distribution sampling (no top-k/top-p,
temperature 1). The tokens go to seeded, resumable shards on disk (rerun the command with the same
``--out`` and it picks up where it stopped); the counts are accumulated shard by shard and a
softmax mixture is fitted to them for K = 1..``--max-k``, with the held-out per-token log-likelihood
of a second set of streams and BIC. The law of a free-running stream is a mixture over *all* the
contexts visited, so no finite K is "true"; each extra component costs L + 1 = 577 parameters, so with
the default ~2 000 tokens K = 1 wins on both held-out likelihood and BIC (the fit of K = 2, 3 overfits:
training likelihood up, held-out down). Sample more (``--n-sequences``) before asking for more components.
About 2.7 minutes on a 2-core CPU with the defaults (generation ~20 s, fits ~2 min).

    python examples/streams.py [--n-sequences 32] [--max-new-tokens 64] [--max-k 3] [--polish-iter 500] [--n-moves N] [--out streams/]
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time
from pathlib import Path

from torch_softmix import EMFitter, hf, tune_memory_allocator
from torch_softmix import simulate as sim
from torch_softmix.io import read_shard

PROMPTS = ["Once upon a time", "The best way to learn programming is", "In 1969,"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-sequences", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-k", type=int, default=3)
    ap.add_argument("--polish-iter", type=int, default=500)
    n_moves = inspect.signature(EMFitter).parameters["n_moves"].default  # the fitter's own default
    ap.add_argument("--n-moves", type=int, default=n_moves, help="split-and-merge rounds (EMFitter n_moves; 0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for the shards (default: a temporary folder)")
    args = ap.parse_args()
    tune_memory_allocator()  # keep freed memory in the process: passes over the vocabulary stop page-faulting

    t0 = time.perf_counter()
    model, tok = hf.load_smollm2()
    design = hf.output_design(model)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        kw = dict(temperature=1.0, batch_size=16, progress=True)
        train = hf.sample_streams(
            model, tok, PROMPTS, args.n_sequences, args.max_new_tokens, seed=args.seed, out_dir=root / "train", **kw
        )
        hf.sample_streams(
            model, tok, PROMPTS, args.n_sequences, args.max_new_tokens, seed=args.seed + 1, out_dir=root / "heldout", **kw
        )
        # Counts from the shards on disk (what `softmix fit --shards` does), never one big token tensor.
        counts = hf.counts_from_shards(root / "train", design.X.shape[0], design.fingerprint)
        held_counts = hf.counts_from_shards(root / "heldout", design.X.shape[0], design.fingerprint)
        print(f"{int(counts.total):,} training tokens ({counts.n_distinct:,} distinct) in {len(train.shards)} shards, "
              f"{int(held_counts.total):,} held-out; {time.perf_counter() - t0:.1f} s")
        first, _ = read_shard(train.shards[0])
        print(f"start of the first shard: {tok.decode(first[:40].tolist())!r}")

    print(f"\n{'K':>3}{'train ll/tok':>14}{'held-out ll/tok':>17}{'BIC':>14}{'iters':>7}{'sec':>7}")
    for K in range(1, args.max_k + 1):
        t1 = time.perf_counter()
        fitter = EMFitter(K, random_state=args.seed, polish_iter=args.polish_iter, n_moves=args.n_moves)
        head = fitter.fit(design.X, counts=counts, bias=design.bias)
        ll = float(head.loglik(counts))
        bic = sim.information_criteria(ll, K, design.X.shape[1], counts.total)["bic"]
        held_ll = float(head.loglik(held_counts)) / held_counts.total
        print(f"{K:>3}{ll / counts.total:>14.4f}{held_ll:>17.4f}{bic:>14.0f}{fitter.n_iter_:>7}"
              f"{time.perf_counter() - t1:>7.1f}")
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
