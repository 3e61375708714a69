"""Training an output head on a frozen causal LM with Lightning.

- :class:`FrozenLMHead`: a ``LightningModule`` that trains only the head. The backbone is frozen at
  construction (``requires_grad_(False)``), so DDP has no unused parameters to complain about, and
  Lightning checkpoints hold the head's parameters only.
- :class:`TokenBlocks`: a ``LightningDataModule`` over plain text files (tokenised, joined with the
  end-of-sequence token and packed into blocks), 1-D token tensors or safetensors files holding one.
- :class:`HeadCheckpoint`: a callback that saves the head (``save_pretrained``: safetensors + config,
  loadable without Lightning) after every validation, and the best one by held-out loss.

Batches are dicts: ``{"input_ids": (B, T)}`` (the backbone runs, under ``no_grad``) or, when the
frozen backbone's features were computed once beforehand, ``{"hidden_states": (B, T, L), "labels": (B, T)}``
with ``labels[t]`` the token that follows position ``t`` (``-100`` where there is none).

Lightning is an optional dependency: ``pip install "torch_softmix[lightning]"``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

try:
    import lightning as L
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'torch_softmix.training needs Lightning: pip install "torch_softmix[lightning]"'
    ) from err

from .validation import check_int, check_number

IGNORE_INDEX = -100


def backbone_of(model: nn.Module) -> nn.Module:
    """The part of a Hugging Face causal LM that returns final hidden states (``model.base_model``)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(
            f"{type(model).__name__} has no separate base model (model.base_model); pass a Hugging Face "
            "causal LM such as LlamaForCausalLM or GPT2LMHeadModel"
        )
    return base


@torch.no_grad()
def final_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``(B, T)`` token ids -> ``(B, T, L)`` final hidden states (after the final norm) of a frozen model."""
    out = backbone_of(model)(input_ids=input_ids, attention_mask=attention_mask)
    return out.last_hidden_state


def next_token_labels(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``labels[:, t] = input_ids[:, t + 1]``; :data:`IGNORE_INDEX` at the last position and on padding."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        labels[:, :-1][attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return labels


class FrozenLMHead(L.LightningModule):
    """Train ``head`` (a :class:`~torch_softmix.MixtureOfSoftmaxesHead`, or any module with
    ``loss(hidden_states, labels)``) on the next-token loss of a frozen causal LM.

    Args:
        model: the Hugging Face causal LM; frozen here (``requires_grad_(False)``, ``eval()``).
        head: the head to train; it must be built on this model's output embedding.
        lr, weight_decay: AdamW settings.

    Logged: ``train_loss`` (nats per token), ``val_loss`` and ``val_ppl`` (token-weighted over the
    whole held-out set, summed across processes).
    """

    def __init__(self, model: nn.Module, head: nn.Module, *, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        check_number("lr", lr, strict=True)
        check_number("weight_decay", weight_decay)
        if not callable(getattr(head, "loss", None)):
            raise TypeError(f"head must have a loss(hidden_states, labels) method, got {type(head).__name__}")
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.head = head
        self.lr, self.weight_decay = lr, weight_decay
        self.strict_loading = False  # checkpoints hold the head only
        self._val = torch.zeros(2, dtype=torch.float64)

    def train(self, mode: bool = True) -> FrozenLMHead:
        super().train(mode)
        self.model.eval()  # the backbone stays in inference mode (no dropout)
        return self

    def features(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(hidden_states (B, T, L), labels (B, T))`` of a batch (see the module docstring)."""
        if "hidden_states" in batch:
            return batch["hidden_states"], batch["labels"]
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        return final_hidden_states(self.model, ids, mask), next_token_labels(ids, mask)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        hidden, labels = self.features(batch)
        loss = self.head.loss(hidden, labels, ignore_index=IGNORE_INDEX)
        self.log("train_loss", loss, prog_bar=True, batch_size=int((labels != IGNORE_INDEX).sum()))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        hidden, labels = self.features(batch)
        n = int((labels != IGNORE_INDEX).sum())
        if n:
            self._val += torch.stack([self.head.loss(hidden, labels, ignore_index=IGNORE_INDEX).double() * n,
                                      torch.tensor(float(n), dtype=torch.float64, device=self.device)])

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val, reduce_op="sum")
        loss = (total[0] / total[1].clamp_min(1)).float()
        # already summed over processes: sync_dist averages identical values (and keeps Lightning quiet)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_ppl", loss.exp(), sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.head.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("head.")}


class HeadCheckpoint(L.Callback):
    """Save the head as ``dirpath/last`` after every validation and as ``dirpath/best`` when
    ``val_loss`` improves: ``save_pretrained`` folders (safetensors + config), no backbone, no Lightning."""

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dirpath = Path(dirpath)
        self.best = math.inf

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        loss = float(trainer.callback_metrics.get("val_loss", math.nan))
        head = pl_module.head
        head.fit_info = {**getattr(head, "fit_info", {}), "val_loss": loss, "global_step": trainer.global_step}
        head.save_pretrained(self.dirpath / "last")
        if loss < self.best:
            self.best = loss
            head.save_pretrained(self.dirpath / "best")


# ---------------------------------------------------------------------- data
def split_files(paths: Sequence[str | os.PathLike], val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Split files (not lines) into train and held-out lists, reproducibly."""
    check_number("val_fraction", val_fraction, strict=True)
    if val_fraction >= 1:
        raise ValueError(f"val_fraction must be < 1, got {val_fraction}")
    paths = sorted(str(p) for p in paths)
    if len(paths) < 2:
        raise ValueError(f"need at least two files to split into train and held-out, got {len(paths)}")
    random.Random(seed).shuffle(paths)
    n_val = min(len(paths) - 1, max(1, round(val_fraction * len(paths))))
    return paths[n_val:], paths[:n_val]


def _read_tokens(source, tokenizer) -> Tensor:
    if torch.is_tensor(source):
        if source.dim() != 1 or source.is_floating_point():
            raise ValueError(f"a token tensor must be 1-D integer ids, got {source.dtype} of shape {tuple(source.shape)}")
        return source.long()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        for key in ("input_ids", "tokens"):
            if key in tensors:
                return _read_tokens(tensors[key].reshape(-1), tokenizer)
        raise ValueError(f"{str(path)!r} holds no 'input_ids' or 'tokens' tensor (found {sorted(tensors)})")
    if tokenizer is None:
        raise ValueError(f"{str(path)!r} is a text file: pass tokenizer= to TokenBlocks")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def pack_blocks(sources: Sequence, tokenizer, block_size: int, max_tokens: int | None = None) -> Tensor:
    """Tokenise ``sources`` (text files, safetensors token files or 1-D tensors), join them and cut the
    stream into ``(n_blocks, block_size)`` blocks (the tail that does not fill a block is dropped)."""
    check_int("block_size", block_size, 2)
    parts, n = [], 0
    for src in sources:
        parts.append(_read_tokens(src, tokenizer))
        n += parts[-1].numel()
        if max_tokens is not None and n >= max_tokens:
            break
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n_blocks = stream.numel() // block_size
    if n_blocks == 0:
        raise ValueError(f"the sources hold {stream.numel()} tokens, fewer than one block of block_size={block_size}")
    return stream[: n_blocks * block_size].view(n_blocks, block_size)


class _Blocks(Dataset):
    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.blocks[i]}


class TokenBlocks(L.LightningDataModule):
    """Train / held-out token blocks ``{"input_ids": (batch_size, block_size)}``.

    Args:
        train, val: text files, safetensors token files (a 1-D ``input_ids`` or ``tokens`` tensor), or
            1-D id tensors. Split by file (:func:`split_files`) so no document is in both.
        tokenizer: needed for text files.
        block_size: tokens per block; batch_size: blocks per batch.
        max_train_tokens, max_val_tokens: optional token budgets (the first tokens are kept).
        seed: shuffling of the training blocks.
    """

    def __init__(
        self,
        train: Sequence,
        val: Sequence,
        *,
        tokenizer=None,
        block_size: int = 256,
        batch_size: int = 8,
        max_train_tokens: int | None = None,
        max_val_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size)
        check_int("block_size", block_size, 2)
        self.sources = {"train": list(train), "val": list(val)}
        for name, src in self.sources.items():
            if not src:
                raise ValueError(f"{name} is empty: pass at least one file or tensor")
        self.tokenizer, self.block_size, self.batch_size, self.seed = tokenizer, block_size, batch_size, seed
        self.budget = {"train": max_train_tokens, "val": max_val_tokens}
        self.blocks: dict[str, Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        for name in ("train", "val"):
            if name not in self.blocks:
                self.blocks[name] = pack_blocks(self.sources[name], self.tokenizer, self.block_size, self.budget[name])

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(_Blocks(self.blocks["train"]), batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Blocks(self.blocks["val"]), batch_size=self.batch_size)


@torch.no_grad()
def sample_at_states(
    embedding: Tensor,
    hidden_states: Tensor,
    n_tokens: int,
    bias: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    chunk: int = 256,
) -> Tensor:
    """The model's own samples: ``n_tokens`` ids ``(n_tokens,)``, each drawn from ``softmax(X h + b)`` at a
    context ``h`` picked uniformly from ``hidden_states (n, L)`` (frozen features computed once).

    Their counts are what an unconditional mixture is fitted to before :meth:`MixtureOfSoftmaxesHead.from_fitted`.
    """
    check_int("n_tokens", n_tokens)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    picks = torch.randint(0, hidden.shape[0], (n_tokens,), generator=generator)
    X = embedding.float()
    out = []
    for lo in range(0, n_tokens, chunk):
        h = hidden[picks[lo : lo + chunk]].to(embedding.device, torch.float32)
        logits = h @ X.T if bias is None else h @ X.T + bias.float()
        probs = torch.softmax(logits, -1).cpu()
        out.append(torch.multinomial(probs, 1, generator=generator)[:, 0])
    return torch.cat(out)
