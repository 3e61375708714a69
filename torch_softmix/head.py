"""SoftmaxMixtureHead: a mixture of softmaxes over a frozen output embedding (docs/MATH.md §1).

    pi = sum_k alpha_k softmax(X beta_k + b)

The embedding ``X (p, L)`` (a language model's ``lm_head.weight``) is held as a buffer that
shares storage with the tensor it was given: it is never copied, never trained and never
saved with the head. Everything that touches all ``p`` rows goes through the chunked
passes of :mod:`torch_softmix.kernels`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import kernels
from .data import TokenCounts, as_counts
from .io import atomic_write_bytes, check_saved_design, embedding_fingerprint, read_head_file, write_head_file
from .validation import check_design, check_design_finite, check_int, check_simplex, check_token_ids

#: File names of the folder form (``save_pretrained`` / ``from_pretrained``).
CONFIG_NAME = "softmix_config.json"
WEIGHTS_NAME = "head.safetensors"


def _param_dtype(embedding: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return embedding.dtype if embedding.dtype in (torch.float32, torch.float64) else torch.float32


class SoftmaxMixtureHead(nn.Module):
    """A K-component softmax mixture over a frozen embedding.

    Args:
        embedding: ``X (p, L)``, floating. Kept by reference (``.detach()``, same storage).
        n_components: ``K >= 1``.
        bias: optional frozen ``b (p,)``.
        alpha: optional initial weights ``(K,)`` (positive; normalised). Default uniform.
        beta: optional initial atoms ``(K, L)``. Default zeros (every component uniform over tokens).
        dtype: parameter / compute dtype; default the embedding's if float32/float64, else float32.
        chunk_size: rows of ``X`` per chunk in passes over the vocabulary (default: automatic).
        validate_args: check that the embedding and bias are finite (one chunked pass over ``X``), as
            ``torch.distributions`` validates its arguments; ``False`` skips the pass.

    Parameters: ``log_alpha (K,)``, ``beta (K, L)``. Buffers (not saved in ``state_dict``):
    ``embedding (p, L)``, ``bias (p,)`` or ``None``.
    """

    embedding: Tensor
    bias: Tensor | None

    def __init__(
        self,
        embedding: Tensor,
        n_components: int,
        bias: Tensor | None = None,
        *,
        alpha: Tensor | None = None,
        beta: Tensor | None = None,
        dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        embedding, bias = check_design(embedding, bias)
        check_int("n_components", n_components)
        if validate_args:
            check_design_finite(embedding, bias, chunk_size)
        p, L = embedding.shape
        dt = _param_dtype(embedding, dtype)
        dev = embedding.device
        self.register_buffer("embedding", embedding, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.chunk_size = chunk_size
        self.fit_info: dict[str, Any] = {}
        self.log_alpha = nn.Parameter(torch.full((n_components,), -math.log(n_components), dtype=dt, device=dev))
        self.beta = nn.Parameter(torch.zeros(n_components, L, dtype=dt, device=dev))
        if alpha is not None or beta is not None:
            self.set_parameters(alpha=alpha, beta=beta)

    # ------------------------------------------------------------------ sizes
    @property
    def n_components(self) -> int:
        return self.beta.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.embedding.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embedding.shape[1]

    @property
    def alpha(self) -> Tensor:
        """Mixture weights ``(K,)``, on the simplex."""
        return torch.softmax(self.log_alpha, dim=0)

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}, vocab_size={self.vocab_size}, hidden_size={self.hidden_size}"

    @torch.no_grad()
    def set_parameters(self, alpha: Tensor | None = None, beta: Tensor | None = None) -> SoftmaxMixtureHead:
        """Set ``alpha (K,)`` (normalised; zeros allowed) and/or ``beta (K, L)`` in place."""
        K, L = self.beta.shape
        if alpha is not None:
            self.log_alpha.copy_(torch.log(check_simplex("alpha", alpha, K)))
        if beta is not None:
            beta = torch.as_tensor(beta)
            if beta.shape != (K, L):
                raise ValueError(
                    f"beta must have shape ({K}, {L}) (n_components, hidden_size), got {tuple(beta.shape)}"
                )
            if not torch.isfinite(beta).all():
                raise ValueError("beta contains NaN or infinite values")
            self.beta.copy_(beta)
        return self

    # ------------------------------------------------------------------ laws
    def log_normalizers(self) -> Tensor:
        """``A(beta_k)``: ``(K,)`` float64. One pass over the embedding."""
        return kernels.log_normalizer(self.embedding, self.beta, self.bias, self.chunk_size)

    def _tokens(self, tokens: Tensor) -> Tensor:
        return check_token_ids(tokens, self.vocab_size, device=self.embedding.device)

    def component_log_probs(self, tokens: Tensor | None = None) -> Tensor:
        """``log s_k(j)`` for each component: ``(*tokens.shape, K)``; ``(p, K)`` when ``tokens`` is None.

        One chunked pass over the embedding (the normalisers need every row); differentiable.
        """
        lg = kernels.logits(self.embedding, self.beta, self.bias, chunk_size=self.chunk_size)  # (p, K) float64
        log_s = (lg - kernels.log_normalizer_from_logits(lg)).to(self.beta.dtype)
        if tokens is None:
            return log_s
        tokens = self._tokens(tokens)
        return log_s.index_select(0, tokens.reshape(-1)).reshape(*tokens.shape, self.n_components)

    def _joint(self, tokens: Tensor | None) -> Tensor:
        """``log alpha_k + log s_k(j)``: ``(*tokens.shape, K)``."""
        return torch.log_softmax(self.log_alpha, 0) + self.component_log_probs(tokens)

    def log_prob(self, tokens: Tensor) -> Tensor:
        """``log pi_j`` for token ids of any shape; returns the same shape."""
        return torch.logsumexp(self._joint(tokens), dim=-1)

    def log_probs(self) -> Tensor:
        """The full log law ``log pi``: ``(p,)``."""
        return torch.logsumexp(self._joint(None), dim=-1)

    def responsibilities(self, counts: Tensor | TokenCounts | None = None, *, tokens: Tensor | None = None) -> Tensor:
        """Posterior component probabilities ``gamma_jk``.

        With ``counts`` (``(p,)`` or :class:`TokenCounts`): ``(S, K)`` on the support ``S`` of the
        counts (sorted ids). With ``tokens=`` (any shape): ``(*tokens.shape, K)``. The data arguments
        come in the same order as in :meth:`loglik`.
        """
        if counts is not None:
            if tokens is not None:
                raise ValueError("pass tokens or counts, not both")
            tokens = as_counts(None, counts, self.vocab_size).support
        if tokens is None:
            raise ValueError("pass tokens= or counts=")
        return torch.softmax(self._joint(tokens), dim=-1)

    @torch.no_grad()
    def loglik(self, counts: Tensor | TokenCounts | None = None, *, tokens: Tensor | None = None) -> Tensor:
        """``sum_j n_j log pi_j`` (float64 scalar) for counts ``(p,)`` / :class:`TokenCounts`, or ``tokens=``."""
        c = as_counts(tokens, counts, self.vocab_size).to(self.embedding.device)
        stats = kernels.e_step(
            self.embedding,
            self.beta,
            self.log_alpha.double().log_softmax(0),
            self.log_normalizers(),
            c.support,
            c.values,
            self.bias,
            self.chunk_size,
        )
        return stats.loglik

    def forward(self, hidden_states: Tensor | None = None) -> Tensor:
        """Log-probabilities usable as logits: ``(p,)``, or ``(*hidden_states.shape[:-1], p)``.

        The mixture does not depend on the context, so every position gets the same law.
        """
        lp = self.log_probs()
        if hidden_states is None:
            return lp
        return lp.expand(*hidden_states.shape[:-1], self.vocab_size)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` token ids ``(n,)`` int64 from ``pi`` (with replacement)."""
        check_int("n", n, 0)
        probs = self.log_probs().double().exp()
        if generator is not None and generator.device != probs.device:
            probs = probs.to(generator.device)
        out = (
            torch.multinomial(probs, n, replacement=True, generator=generator)
            if n
            else torch.zeros(0, dtype=torch.long)
        )
        return out.to(self.embedding.device)

    # ------------------------------------------------------------------ files
    def fingerprint(self) -> str:
        """The fingerprint of this head's design (see :func:`torch_softmix.io.embedding_fingerprint`)."""
        return embedding_fingerprint(self.embedding, self.bias)

    def save(self, path: str | os.PathLike) -> None:
        """Write the parameters and metadata to a safetensors file, atomically.

        The embedding is not stored; its fingerprint is, and :meth:`load` checks it.
        """
        meta = {
            "n_components": str(self.n_components),
            "vocab_size": str(self.vocab_size),
            "hidden_size": str(self.hidden_size),
            "dtype": str(self.beta.dtype).removeprefix("torch."),
            "has_bias": json.dumps(self.bias is not None),
            "embedding_fingerprint": self.fingerprint(),
            "fit": json.dumps(self.fit_info, sort_keys=True, default=str),
        }
        write_head_file(path, {"log_alpha": self.log_alpha, "beta": self.beta}, meta)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save as a folder, Hugging Face style: ``head.safetensors`` and ``softmix_config.json``.

        The config records the sizes, the embedding fingerprint and, when the head was fitted through
        :mod:`torch_softmix.hf`, which model's embedding it belongs to. Both files are written atomically.
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.save(folder / WEIGHTS_NAME)
        config = {
            "format": "torch_softmix.head",
            "format_version": 1,
            "n_components": self.n_components,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "dtype": str(self.beta.dtype).removeprefix("torch."),
            "has_bias": self.bias is not None,
            "embedding_fingerprint": self.fingerprint(),
            "model": self.fit_info.get("model"),
            "fit": self.fit_info,
        }
        atomic_write_bytes(folder / CONFIG_NAME, json.dumps(config, indent=1, default=str).encode())

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        embedding: Tensor,
        bias: Tensor | None = None,
        *,
        check_embedding: bool = True,
        chunk_size: int | None = None,
    ) -> SoftmaxMixtureHead:
        """Load a folder written by :meth:`save_pretrained` onto ``embedding (p, L)``."""
        folder = Path(directory)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no {CONFIG_NAME}; is it a folder saved by save_pretrained?")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(config_path)!r} is not valid JSON (corrupt?): {err}") from err
        if int(config.get("format_version", 0)) > 1:
            raise ValueError(
                f"{str(folder)!r} uses head format version {config['format_version']}; upgrade torch_softmix"
            )
        return cls.load(folder / WEIGHTS_NAME, embedding, bias, check_embedding=check_embedding, chunk_size=chunk_size)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        embedding: Tensor,
        bias: Tensor | None = None,
        *,
        check_embedding: bool = True,
        chunk_size: int | None = None,
    ) -> SoftmaxMixtureHead:
        """Load a head saved by :meth:`save` onto ``embedding (p, L)`` (and ``bias``).

        Raises ``ValueError`` when the file's fingerprint does not match the given design
        (pass ``check_embedding=False`` to load anyway, e.g. onto a re-quantised copy).
        """
        tensors, meta = read_head_file(path)
        embedding, bias = check_design(embedding, bias)
        beta, log_alpha = tensors["beta"], tensors["log_alpha"]
        if beta.dim() != 2 or log_alpha.shape != (beta.shape[0],):
            raise ValueError(
                f"{str(path)!r} holds inconsistent shapes: beta {tuple(beta.shape)}, log_alpha {tuple(log_alpha.shape)}"
            )
        check_saved_design(path, meta, beta.shape[1], embedding, bias, check_embedding)
        head = cls(embedding, beta.shape[0], bias, dtype=beta.dtype, chunk_size=chunk_size)
        with torch.no_grad():
            head.log_alpha.copy_(log_alpha)
            head.beta.copy_(beta)
        head.fit_info = json.loads(meta.get("fit", "{}"))
        return head
