"""The ``softmix`` command: sample -> fit -> eval -> inspect, and a demo on SmolLM2. A thin layer over the API.

    softmix demo                                   # SmolLM2: K = 4 prompts, 10^6 next tokens, fit, compare
    softmix sample --model smollm2 --prompt "The capital of France is" --prompt "Once upon a time" \\
                   --weights 0.7 0.3 --n-tokens 100000 --out shards/
    softmix fit --model smollm2 --shards shards/ -K 2 --out head.safetensors
    softmix eval --model smollm2 --head head.safetensors --shards heldout/ [--truth shards/]
    softmix inspect --model smollm2 --head head.safetensors --top 10
    softmix generate --model smollm2 --head head.safetensors --prompt "Hello" -n 3   # the head as output layer

User mistakes (missing files, bad arguments, a head of another model) end with a one-line message and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from . import simulate as sim
from .data import TokenCounts
from .demo import print_demo, run_demo
from .design import Design
from .dist import Comm, shutdown
from .em import EMFitter
from .head import SoftmaxMixtureHead
from .io import atomic_write_bytes
from .starts import STARTS
from .system import tune_memory_allocator


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


def _model(args):
    from . import hf

    try:
        model, tok = hf.load_model(args.model, gguf_file=getattr(args, "gguf_file", None))
    except (OSError, ModuleNotFoundError) as err:
        raise UserError(f"cannot load model {args.model!r}: {err}") from err
    return model, tok, hf.output_design(model)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file {path} does not exist")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one --prompt or a --prompts-file (one prompt per line)")
    return prompts


def cmd_sample(args) -> int:
    from . import hf

    comm = Comm.from_env()  # under torchrun: each rank draws its share of the shards (data-parallel)
    model, tok, _ = _model(args)
    prompts = _read_prompts(args)
    if args.mode == "next-token":
        if args.weights is not None and len(args.weights) != len(prompts):
            raise UserError(f"--weights has {len(args.weights)} numbers for {len(prompts)} prompts")
        sample = hf.sample_next_tokens(
            model,
            tok,
            prompts,
            args.n_tokens,
            weights=args.weights,
            temperature=args.temperature,
            seed=args.seed,
            out_dir=args.out,
            progress=not args.quiet,
            comm=comm,
        )
    else:
        sample = hf.sample_streams(
            model,
            tok,
            prompts,
            args.n_sequences,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            batch_size=args.batch_size,
            seed=args.seed,
            out_dir=args.out,
            progress=not args.quiet,
            comm=comm,
        )
    if comm.rank == 0:
        print(
            f"{int(sample.counts.total):,} tokens ({sample.counts.n_distinct:,} distinct) in {len(sample.shards)} "
            f"shards under {args.out}" + (f" (written by {comm.world_size} ranks)" if comm.distributed else "")
        )
    return 0


def _counts(shards: str, design):
    from . import hf

    if not Path(shards).exists():
        raise UserError(f"--shards {shards} does not exist")
    return hf.counts_from_shards(shards, design.X.shape[0], design.fingerprint)


def _file_design(path: str, comm: Comm) -> Design:
    """A design from a safetensors file with ``weight (p, L)`` and optional ``bias (p,)``."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise UserError(f"--design {path} does not exist")
    tensors = load_file(path)
    if "weight" not in tensors:
        raise UserError(f"--design {path} holds no tensor 'weight' (p, L); it holds {sorted(tensors)}")
    return Design(tensors["weight"], tensors.get("bias"), identity={"design_file": str(path)}, comm=comm)


def _fit_data(args, comm: Comm) -> tuple[Design, TokenCounts]:
    """The design (``--design`` file or ``--model``) and the counts (``--counts`` file or ``--shards``)."""
    if args.design:
        design = _file_design(args.design, comm)
    else:
        _, _, d = _model(args)
        design = Design(d.X, d.bias, identity=d.identity, comm=comm, validate=False)  # checked by output_design
    if bool(args.counts) == bool(args.shards):
        raise UserError("give exactly one of --shards (a folder of token shards) or --counts (a safetensors file)")
    if args.counts:
        from safetensors.torch import load_file

        if not Path(args.counts).is_file():
            raise UserError(f"--counts {args.counts} does not exist")
        tensors = load_file(args.counts)
        if "counts" not in tensors:
            raise UserError(f"--counts {args.counts} holds no tensor 'counts' (p,); it holds {sorted(tensors)}")
        return design, TokenCounts.from_dense(tensors["counts"], design.vocab_size)
    return design, _counts(args.shards, design)


def cmd_fit(args) -> int:
    comm = Comm.from_env()
    design, counts = _fit_data(args, comm)
    fitter = EMFitter(
        args.K,
        init=args.init,
        n_init=args.n_init,
        init_max_iter=args.init_max_iter,
        max_iter=args.max_iter,
        polish_iter=args.polish_iter,
        n_moves=args.n_moves,
        n_transfers=args.n_transfers,
        tol=args.tol,
        ridge=args.ridge,
        random_state=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    t0 = time.perf_counter()
    head = fitter.fit(design, counts=counts)
    if comm.rank == 0:  # the fit is replicated: one rank writes and reports
        head.fit_info["model"] = design.identity
        head.save(args.out)
        ranks = f" on {comm.world_size} ranks" if comm.distributed else ""
        print(
            f"fitted K={args.K} on {int(counts.total):,} tokens in {time.perf_counter() - t0:.1f} s{ranks}: "
            f"{fitter.n_iter_} iterations, converged={fitter.converged_}, loglik/token={fitter.lower_bound_:.6f}, "
            f"best start={fitter.init_names_[fitter.best_init_]}; saved {args.out}"
        )
    comm.barrier()
    return 0


def _load_head(path: str, design) -> SoftmaxMixtureHead:
    if not Path(path).is_file():
        raise UserError(f"--head {path} does not exist")
    return SoftmaxMixtureHead.load(path, design.X, design.bias)


def cmd_eval(args) -> int:
    model, tok, design = _model(args)  # loaded once, also for --truth
    head = _load_head(args.head, design)
    counts = _counts(args.shards, design)
    N = counts.total
    ll = float(head.loglik(counts))
    ic = sim.information_criteria(ll, head.n_components, head.hidden_size, N)
    out = {"tokens": N, "loglik_per_token": ll / N, **ic}
    if args.truth:
        from . import hf

        cfg = Path(args.truth) / "sampler.json"
        if not cfg.is_file():
            raise UserError(f"--truth {args.truth} has no sampler.json (sample it with `softmix sample`)")
        settings = json.loads(cfg.read_text())
        if settings.get("mode") != "next-token":
            raise UserError("--truth needs next-token shards: free-running streams have no known truth")
        atoms = hf.true_atoms(model, tok, settings["prompts"], settings["temperature"])
        true_head = SoftmaxMixtureHead(
            design.X, len(atoms), design.bias, alpha=torch.tensor(settings["weights"]), beta=atoms
        )
        ev = sim.evaluate(head, true_head) if true_head.n_components == head.n_components else {}
        out["true_loglik_per_token"] = float(true_head.loglik(counts)) / N
        out.update({k: ev[k] for k in ("tv", "kl", "weight_error", "component_kl", "cosine") if k in ev})
    print(json.dumps(out, indent=1))
    return 0


def cmd_generate(args) -> int:
    """Attach the head as the model's output layer, generate from prompts, detach."""
    from . import hf

    model, tok, design = _model(args)
    head = _load_head(args.head, design)
    prompts = _read_prompts(args)
    hf.attach_head(model, head)
    try:
        for prompt in prompts:
            inputs = tok(prompt, return_tensors="pt")
            with torch.no_grad(), hf.seeded_global_rng(args.seed):
                out = model.generate(
                    **inputs,
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=args.max_new_tokens,
                    num_return_sequences=args.n,
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                )
            for seq in out:
                text = tok.decode(seq[inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                print(f"{prompt!r} -> {text!r}")
    finally:
        hf.detach_head(model)
    return 0


def cmd_inspect(args) -> int:
    model, tok, design = _model(args)
    head = _load_head(args.head, design)
    with torch.no_grad():
        comp = head.component_log_probs().exp()  # (p, K)
        alpha = head.alpha
    order = torch.argsort(alpha, descending=True)
    for k in order.tolist():
        probs, ids = comp[:, k].topk(args.top)
        entropy = float(-(comp[:, k] * comp[:, k].clamp_min(1e-300).log()).sum())
        words = ", ".join(f"{tok.decode([int(i)])!r} {float(p):.3f}" for p, i in zip(probs, ids))
        print(f"component {k}: weight {float(alpha[k]):.4f}, entropy {entropy:.2f} nats: {words}")
    return 0


def cmd_demo(args) -> int:
    r = run_demo(args.n_tokens, args.n_heldout, args.seed, progress=not args.quiet)
    print_demo(r)
    if args.json:
        atomic_write_bytes(args.json, json.dumps(r, indent=1, default=float).encode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="softmix",
        description="Fit softmax mixtures over a language model's output embedding from tokens sampled from it.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", default="smollm2", help="a local model folder, or 'smollm2' (default)")
        sp.add_argument("--gguf-file", default=None, help="GGUF file inside --model, if the model is stored so")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    sp = sub.add_parser("sample", help="sample next tokens (or free-running streams) into token shards")
    model_args(sp)
    sp.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    sp.add_argument("--prompts-file", help="a file with one prompt per line")
    sp.add_argument("--weights", type=float, nargs="+", help="mixture weights of the prompts (default equal)")
    sp.add_argument("--mode", choices=["next-token", "stream"], default="next-token")
    sp.add_argument("--n-tokens", type=int, default=100_000, help="next tokens to draw (next-token mode)")
    sp.add_argument("--n-sequences", type=int, default=64, help="sequences to generate (stream mode)")
    sp.add_argument("--max-new-tokens", type=int, default=64, help="tokens per sequence (stream mode)")
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--top-k", type=int, default=None, help="truncates the law: the fit is then misspecified")
    sp.add_argument("--top-p", type=float, default=None, help="truncates the law: the fit is then misspecified")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True, help="folder for the shards (created; existing shards are reused)")
    sp.set_defaults(func=cmd_sample)

    sp = sub.add_parser("fit", help="fit a K-component mixture to token shards (or counts) and save the head")
    model_args(sp)
    sp.add_argument("--design", default=None, help="a safetensors file with 'weight' (p, L) and optional 'bias' (p,), "
                    "instead of --model")  # fmt: skip
    sp.add_argument("--shards", default=None, help="folder of token shards")
    sp.add_argument("--counts", default=None, help="a safetensors file with 'counts' (p,), instead of --shards")
    sp.add_argument("-K", "--n-components", dest="K", type=int, required=True)
    lm = {k: v.default for k, v in inspect.signature(EMFitter).parameters.items()}  # the fitter's own defaults
    sp.add_argument("--init", default=lm["init"], choices=list(STARTS))
    sp.add_argument("--n-init", type=int, default=lm["n_init"], help="starts, each screened by --init-max-iter")
    sp.add_argument("--init-max-iter", type=int, default=lm["init_max_iter"], help="EM iterations per start")
    sp.add_argument("--max-iter", type=int, default=lm["max_iter"], help="EM iterations after screening")
    sp.add_argument("--polish-iter", type=int, default=lm["polish_iter"], help="L-BFGS iterations after EM")
    sp.add_argument("--n-moves", type=int, default=lm["n_moves"], help="screened split-and-merge moves continued per round (0: no moves)")
    sp.add_argument("--n-transfers", type=int, default=lm["n_transfers"],
                    help="transfers of each kind (part of one component's data to another) tried per round "
                         "(0: none; 3: slower, finds the right components more often on LM mixtures)")
    sp.add_argument("--tol", type=float, default=lm["tol"])
    sp.add_argument("--ridge", type=float, default=1e-6)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default=None, help="e.g. cuda (default: where the model is)")
    sp.add_argument("--out", required=True, help="the head file to write (.safetensors)")
    sp.set_defaults(func=cmd_fit)

    sp = sub.add_parser("eval", help="held-out per-token log-likelihood, BIC/AIC, and comparison with a truth")
    model_args(sp)
    sp.add_argument("--head", required=True)
    sp.add_argument("--shards", required=True, help="held-out token shards")
    sp.add_argument("--truth", default=None, help="a next-token shard folder whose prompts define the truth")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("inspect", help="weights and top tokens of each component, decoded")
    model_args(sp)
    sp.add_argument("--head", required=True)
    sp.add_argument("--top", type=int, default=10)
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("generate", help="attach a head as the model's output layer and generate from it")
    model_args(sp)
    sp.add_argument("--head", required=True)
    sp.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    sp.add_argument("--prompts-file", help="a file with one prompt per line")
    sp.add_argument("--max-new-tokens", type=int, default=20)
    sp.add_argument("-n", type=int, default=1, help="continuations per prompt")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("demo", help="the SmolLM2 next-token mixture demo")
    sp.add_argument("--n-tokens", type=int, default=10**6)
    sp.add_argument("--n-heldout", type=int, default=10**6)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--json", default=None, help="also write the numbers to this file")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_memory_allocator()
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"softmix {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # validation errors from the library name the argument and the fix
        print(f"softmix {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown()  # a process group started for this command ends with it (clean exit under torchrun)


if __name__ == "__main__":
    sys.exit(main())
