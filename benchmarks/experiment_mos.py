"""Held-out perplexity of conditional heads on frozen SmolLM2, trained with Lightning on Python sources.

Corpus: the Python standard library's own sources (``*.py`` of the running interpreter's ``stdlib``
folder, tests excluded), split by file into train and held-out. SmolLM2 stays frozen; its final hidden
states are computed once and cached, then every head sees the same training tokens (one epoch of
``--train-tokens`` tokens, same batches, same optimiser):

- base model: SmolLM2's own softmax (no training);
- ``K = 1``: the adapter alone (``h + A B^T h + d``);
- ``K = 4`` warm-started from an EM fit (``MixtureOfSoftmaxesHead.from_fitted``) of the model's own
  samples at training contexts;
- ``K = 4`` from the identity plus noise (``perturb_``).

Resumable: features, the EM fit and each finished configuration are kept under ``--out``. Writes
``mos_smollm2.md`` (table) and ``mos_smollm2.png`` (held-out loss during training) to benchmarks/results/.

    python benchmarks/experiment_mos.py [--train-tokens 100000] [--val-tokens 20000] [--K 4]
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from torch_softmix import EMFitter, MixtureOfSoftmaxesHead, SoftmaxMixtureHead, TokenCounts, hf
from torch_softmix.training import (
    FrozenLMHead,
    HeadCheckpoint,
    TokenBlocks,
    final_hidden_states,
    next_token_labels,
    sample_at_states,
    split_files,
)

RESULTS = Path(__file__).resolve().parent / "results"


def corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if "test" not in p.parts and "site-packages" not in p.parts]
    return [p for p in files if "tests" not in p.parts and "idle_test" not in p.parts]


class Features(Dataset):
    def __init__(self, hidden: torch.Tensor, labels: torch.Tensor) -> None:
        self.hidden, self.labels = hidden, labels

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"hidden_states": self.hidden[i], "labels": self.labels[i]}


def features(model, blocks: torch.Tensor, path: Path, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    if path.is_file():
        t = load_file(str(path))
        return t["hidden"], t["labels"]
    hidden = torch.cat([final_hidden_states(model, blocks[i : i + batch]) for i in range(0, len(blocks), batch)])
    labels = next_token_labels(blocks)
    save_file({"hidden": hidden.contiguous(), "labels": labels}, str(path))
    return hidden, labels


def base_loss(design, hidden: torch.Tensor, labels: torch.Tensor) -> float:
    total, n = 0.0, 0
    for h, y in zip(hidden, labels):
        keep = y != -100
        logits = h[keep] @ design.X.T + (0 if design.bias is None else design.bias)
        total += float(torch.nn.functional.cross_entropy(logits, y[keep], reduction="sum"))
        n += int(keep.sum())
    return total / n


def em_fit(design, hidden: torch.Tensor, args, path: Path) -> SoftmaxMixtureHead:
    if path.is_file():
        return SoftmaxMixtureHead.load(path, design.X, design.bias)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = sample_at_states(design.X, hidden, args.em_tokens, design.bias, generator=gen)
    counts = TokenCounts.from_tokens(tokens, design.X.shape[0])
    t0 = time.perf_counter()
    fitted = EMFitter(args.K, random_state=args.seed).fit(design.X, counts=counts, bias=design.bias)
    fitted.fit_info["seconds"] = time.perf_counter() - t0
    fitted.save(path)
    return fitted


def make_head(name: str, design, fitted: SoftmaxMixtureHead, args) -> MixtureOfSoftmaxesHead:
    gen = torch.Generator().manual_seed(args.seed)
    if name == "K=1 adapter":
        return MixtureOfSoftmaxesHead(design.X, 1, design.bias, rank=args.rank, generator=gen, validate_args=False)
    if "from EM" in name:
        scale = float(name.rsplit("×", 1)[1])
        return MixtureOfSoftmaxesHead.from_fitted(fitted, rank=args.rank, offset_scale=scale, generator=gen)
    head = MixtureOfSoftmaxesHead(design.X, args.K, design.bias, rank=args.rank, generator=gen, validate_args=False)
    return head.perturb_(args.noise, generator=gen)


class Curve(L.Callback):
    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.points.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))


def train(name: str, model, design, fitted, train_set, val_set, args, out: Path) -> dict:
    torch.manual_seed(args.seed)
    head = make_head(name, design, fitted, args)
    module = FrozenLMHead(model, head, lr=args.lr)
    kw = {"accelerator": "cpu", "logger": False, "enable_model_summary": False, "enable_progress_bar": True}
    val_loader = DataLoader(val_set, batch_size=args.batch_size)
    start = L.Trainer(**kw).validate(module, val_loader, verbose=False)[0]["val_loss"]
    curve = Curve()
    steps = len(train_set) // args.batch_size
    trainer = L.Trainer(
        max_epochs=1,
        val_check_interval=max(1, steps // 4),
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
        callbacks=[curve, HeadCheckpoint(out / "".join(c if c.isalnum() else "_" for c in name))],
        **kw,
    )
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    trainer.fit(module, DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen), val_loader)
    seconds = time.perf_counter() - t0
    final = curve.points[-1][1]
    return {"name": name, "start_loss": start, "val_loss": final, "val_ppl": math.exp(final),
            "curve": [(0, start)] + curve.points, "seconds": seconds, "steps": trainer.global_step}


def report(rows: list[dict], meta: dict) -> None:
    lines = [
        "# Conditional heads on frozen SmolLM2 (benchmarks/experiment_mos.py)",
        "",
        f"Corpus: Python {meta['python']} standard library sources, split by file: {meta['train_files']} train files, "
        f"{meta['val_files']} held-out files; {meta['train_tokens']:,} training tokens (one epoch, batch "
        f"{meta['batch_size']} × {meta['block_size']} tokens, AdamW lr {meta['lr']}), {meta['val_tokens']:,} held-out "
        f"tokens. Adapters of rank {meta['rank']}. EM fit: K = {meta['K']} on {meta['em_tokens']:,} samples of the "
        f"model at training contexts ({meta['em_seconds']:.0f} s).",
        "",
        "| head | held-out loss at start (nats/token) | after training | held-out perplexity | train time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['start_loss']:.4f} | {r['val_loss']:.4f} | {r['val_ppl']:.3f} | {r['seconds']:.0f} |")
    (RESULTS / "mos_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["curve"]:
            steps, losses = zip(*r["curve"])
            ax.plot(steps, losses, marker="o", label=r["name"])
        else:
            ax.axhline(r["val_loss"], color="k", linestyle="--", label=r["name"])
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("SmolLM2 frozen, heads trained on stdlib sources")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "mos_smollm2.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-tokens", type=int, default=100_000)
    ap.add_argument("--val-tokens", type=int, default=20_000)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--offset-scales", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--em-tokens", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("mos_experiment"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model, tok = hf.load_smollm2()
    design = hf.output_design(model)
    train_files, val_files = split_files(corpus_files(), 0.2, seed=args.seed)
    data = TokenBlocks(train_files, val_files, tokenizer=tok, block_size=args.block_size,
                       max_train_tokens=args.train_tokens, max_val_tokens=args.val_tokens, seed=args.seed)
    data.setup()
    h_train, y_train = features(model, data.blocks["train"], args.out / "train_features.safetensors")
    h_val, y_val = features(model, data.blocks["val"], args.out / "val_features.safetensors")
    fitted = em_fit(design, h_train, args, args.out / "em_fit.safetensors")
    base = base_loss(design, h_val, y_val)
    rows = [{"name": "base model", "start_loss": base, "val_loss": base, "val_ppl": math.exp(base), "curve": [],
             "seconds": 0.0}]
    done = args.out / "rows.jsonl"
    finished = {json.loads(line)["name"]: json.loads(line) for line in done.read_text().splitlines()} if done.is_file() else {}
    names = ["K=1 adapter"] + [f"K={args.K} from EM, offsets ×{s}" for s in args.offset_scales]
    for name in names + [f"K={args.K} identity + noise"]:
        if name not in finished:
            finished[name] = train(name, model, design, fitted, Features(h_train, y_train), Features(h_val, y_val), args, args.out)
            with done.open("a") as fh:
                fh.write(json.dumps(finished[name]) + "\n")
        rows.append(finished[name])
    meta = {"python": sysconfig.get_python_version(), "train_files": len(train_files), "val_files": len(val_files),
            "train_tokens": int((y_train != -100).sum()), "val_tokens": int((y_val != -100).sum()),
            "batch_size": args.batch_size, "block_size": args.block_size, "lr": args.lr, "rank": args.rank,
            "K": args.K, "em_tokens": args.em_tokens, "em_seconds": float(fitted.fit_info.get("seconds", math.nan))}
    report(rows, meta)


if __name__ == "__main__":
    main()
