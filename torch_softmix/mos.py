"""MixtureOfSoftmaxesHead: a context-dependent mixture of softmaxes over a frozen output embedding.

For a final hidden state ``h (L,)`` of a language model with output embedding ``X (p, L)`` and bias ``b``:

    p(y | h) = sum_k alpha_k(h) softmax(X beta_k(h) + b)_y
    alpha(h)  = softmax(G h + c)                       gate, G (K, L), c (K,)
    beta_k(h) = h + A_k (B_k^T h) + d_k                component states, A_k, B_k (L, r), d_k (L,)

With ``K = 1`` and zero adapters the head is the model's own softmax. Mixing is done in log space
(``logsumexp`` over components), never as ``log(sum of probabilities)``.

Memory: nothing of size ``tokens × K × p`` is built. The vocabulary is walked in chunks of
``chunk_size`` rows, forward and backward (the backward pass recomputes each chunk's logits instead
of saving them, as chunked cross-entropy losses do). Beyond the inputs, the saved component states
``(tokens, K, L)`` and, for :meth:`MixtureOfSoftmaxesHead.forward`, the ``(tokens, p)`` output itself,
the peak is about ``4 · K · chunk_size`` elements per token (:data:`PEAK_ELEMENTS_PER_TOKEN_AND_ROW`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .head import CONFIG_NAME, SoftmaxMixtureHead, _param_dtype
from .io import atomic_write_bytes, check_saved_design, embedding_fingerprint, read_mos_file, write_mos_file
from .validation import check_design, check_design_finite, check_int, check_number, check_token_ids

#: Vocabulary rows per chunk by default.
DEFAULT_CHUNK_ROWS = 4096
#: Peak temporaries are at most this many elements per token, per component and per chunk row.
PEAK_ELEMENTS_PER_TOKEN_AND_ROW = 4
WEIGHTS_NAME = "mos_head.safetensors"


def _chunks(p: int, rows: int):
    for lo in range(0, p, rows):
        yield lo, min(p, lo + rows)


def _chunk_logits(states: Tensor, X: Tensor, bias: Tensor | None, lo: int, hi: int) -> Tensor:
    """``states (..., L) @ X[lo:hi].T + b[lo:hi]``: ``(..., hi - lo)`` in the states' dtype."""
    lg = states @ X[lo:hi].to(states.dtype).T
    if bias is not None:
        lg = lg + bias[lo:hi].to(states.dtype)
    return lg


class _LogNormalizer(torch.autograd.Function):
    """``A(s) = logsumexp_j (x_j . s + b_j)`` for states ``s (N, L)`` -> ``(N,)``, chunked over the vocabulary.

    Gradient: ``dA/ds = sum_j softmax_j x_j``, recomputed chunk by chunk in the backward pass.
    """

    @staticmethod
    def forward(ctx, states: Tensor, X: Tensor, bias: Tensor | None, rows: int) -> Tensor:
        out = torch.full(states.shape[:1], -math.inf, dtype=states.dtype, device=states.device)
        for lo, hi in _chunks(X.shape[0], rows):
            out = torch.logaddexp(out, torch.logsumexp(_chunk_logits(states, X, bias, lo, hi), dim=1))
        ctx.save_for_backward(states, out)
        ctx.X, ctx.bias, ctx.rows = X, bias, rows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        states, out = ctx.saved_tensors
        X, bias = ctx.X, ctx.bias
        grad = torch.zeros_like(states)
        for lo, hi in _chunks(X.shape[0], ctx.rows):
            s = _chunk_logits(states, X, bias, lo, hi).sub_(out[:, None]).exp_()
            grad.addmm_(s, X[lo:hi].to(states.dtype))
        return grad * grad_out[:, None], None, None, None


class _MixtureLogProbs(torch.autograd.Function):
    """``out (N, p) = logsumexp_k (c_k + x_j . s_k + b_j)`` for ``c (N, K)``, states ``s (N, K, L)``.

    The backward pass recomputes the posterior over components chunk by chunk from the saved output.
    """

    @staticmethod
    def forward(ctx, c: Tensor, states: Tensor, X: Tensor, bias: Tensor | None, rows: int) -> Tensor:
        out = torch.empty(states.shape[0], X.shape[0], dtype=states.dtype, device=states.device)
        for lo, hi in _chunks(X.shape[0], rows):
            z = _chunk_logits(states, X, bias, lo, hi).add_(c[:, :, None])
            out[:, lo:hi] = torch.logsumexp(z, dim=1)
        ctx.save_for_backward(c, states, out)
        ctx.X, ctx.bias, ctx.rows = X, bias, rows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        c, states, out = ctx.saved_tensors
        X, bias = ctx.X, ctx.bias
        grad_c = torch.zeros_like(c)
        grad_states = torch.zeros_like(states)
        for lo, hi in _chunks(X.shape[0], ctx.rows):
            z = _chunk_logits(states, X, bias, lo, hi).add_(c[:, :, None])
            w = z.sub_(out[:, None, lo:hi]).exp_().mul_(grad_out[:, None, lo:hi])  # (N, K, rows)
            grad_c += w.sum(dim=2)
            grad_states += w @ X[lo:hi].to(states.dtype)
        return grad_c, grad_states, None, None, None


class MixtureOfSoftmaxesHead(nn.Module):
    """A context-dependent mixture of softmaxes (Yang et al., 2018) over a frozen embedding.

    Args:
        embedding: ``X (p, L)``, floating; kept by reference, never trained or saved.
        n_components: ``K >= 1``.
        bias: optional frozen output bias ``b (p,)``.
        rank: rank ``r`` of the per-component adapters ``A_k B_k^T`` (0: offsets only).
        dtype: parameter / compute dtype; default the embedding's if float32/float64, else float32.
        chunk_size: vocabulary rows per chunk (default :data:`DEFAULT_CHUNK_ROWS`).
        validate_args: check that the embedding and bias are finite (one pass over ``X``).

    Parameters: ``gate_weight G (K, L)``, ``gate_bias c (K,)``, ``down B (K, L, r)``, ``up A (K, r, L)``,
    ``offset d (K, L)``. All start at zero except ``down`` (small, so that ``up`` receives gradients):
    the head starts as the base model's softmax for every ``K`` (the components are then identical;
    call :meth:`perturb_` or use :meth:`from_fitted` to break the symmetry).
    """

    embedding: Tensor
    bias: Tensor | None

    def __init__(
        self,
        embedding: Tensor,
        n_components: int,
        bias: Tensor | None = None,
        *,
        rank: int = 8,
        dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
        validate_args: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        embedding, bias = check_design(embedding, bias)
        check_int("n_components", n_components)
        check_int("rank", rank, 0)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size)
        if validate_args:
            check_design_finite(embedding, bias, chunk_size)
        p, L = embedding.shape
        K = n_components
        dtype = _param_dtype(embedding, dtype)
        kw = {"dtype": dtype, "device": embedding.device}
        self.register_buffer("embedding", embedding, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.chunk_size = chunk_size or DEFAULT_CHUNK_ROWS
        self.gate_weight = nn.Parameter(torch.zeros(K, L, **kw))
        self.gate_bias = nn.Parameter(torch.zeros(K, **kw))
        down = torch.randn(K, L, rank, generator=generator, dtype=dtype) / math.sqrt(L)
        self.down = nn.Parameter(down.to(embedding.device))
        self.up = nn.Parameter(torch.zeros(K, rank, L, **kw))
        self.offset = nn.Parameter(torch.zeros(K, L, **kw))
        self.fit_info: dict = {}

    # ------------------------------------------------------------------ sizes
    @property
    def n_components(self) -> int:
        return self.offset.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.embedding.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embedding.shape[1]

    @property
    def rank(self) -> int:
        return self.down.shape[2]

    def extra_repr(self) -> str:
        return (
            f"n_components={self.n_components}, vocab_size={self.vocab_size}, hidden_size={self.hidden_size}, "
            f"rank={self.rank}, chunk_size={self.chunk_size}"
        )

    # ------------------------------------------------------------------ starts
    @classmethod
    def from_fitted(
        cls,
        fitted: SoftmaxMixtureHead,
        *,
        rank: int = 8,
        offset_scale: float = 1.0,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> MixtureOfSoftmaxesHead:
        """Start from an unconditional mixture fitted by EM on the model's own samples.

        The gate bias is ``log alpha`` of the fit and the offsets are its atoms centred at their
        weighted mean, ``d_k = offset_scale * (beta_k - sum_l alpha_l beta_l)``: at the start each
        component is the context's own state moved the way the fitted component differs from the
        average one, with the fitted weights, so the components are distinct from the first step.
        """
        if not isinstance(fitted, SoftmaxMixtureHead):
            raise TypeError(f"fitted must be a SoftmaxMixtureHead (an EM fit), got {type(fitted).__name__}")
        check_number("offset_scale", offset_scale, 0.0)
        head = cls(
            fitted.embedding,
            fitted.n_components,
            fitted.bias,
            rank=rank,
            dtype=fitted.beta.dtype,
            chunk_size=chunk_size,
            validate_args=False,
            generator=generator,
        )
        with torch.no_grad():
            alpha = fitted.alpha.detach()
            beta = fitted.beta.detach()
            head.gate_bias.copy_(torch.log(alpha.clamp_min(1e-30)))
            head.offset.copy_(offset_scale * (beta - alpha @ beta))
        head.fit_info = {"start": "from_fitted", "offset_scale": offset_scale, "fit": fitted.fit_info}
        return head

    @torch.no_grad()
    def perturb_(self, std: float = 0.02, generator: torch.Generator | None = None) -> MixtureOfSoftmaxesHead:
        """Add Gaussian noise of scale ``std`` (relative to ``1/sqrt(L)`` for the gate) to the gate and offsets,
        breaking the symmetry of the identity start."""
        check_number("std", std, 0.0)
        for par, scale in ((self.gate_weight, 1.0 / math.sqrt(self.hidden_size)), (self.offset, 1.0)):
            noise = torch.randn(par.shape, generator=generator, dtype=par.dtype).to(par.device)
            par.add_(noise, alpha=std * scale)
        return self

    # ------------------------------------------------------------------ the law
    def _states(self, hidden_states: Tensor) -> Tensor:
        if not torch.is_tensor(hidden_states) or not hidden_states.is_floating_point():
            raise TypeError("hidden_states must be a floating tensor of shape (..., hidden_size)")
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must end in hidden_size={self.hidden_size}, got shape {tuple(hidden_states.shape)}"
            )
        return hidden_states.to(device=self.offset.device, dtype=self.offset.dtype)

    def gate_log_weights(self, hidden_states: Tensor) -> Tensor:
        """``log alpha(h)``: ``(..., L)`` -> ``(..., K)``."""
        h = self._states(hidden_states)
        return torch.log_softmax(h @ self.gate_weight.T + self.gate_bias, dim=-1)

    def component_states(self, hidden_states: Tensor) -> Tensor:
        """``beta_k(h)``: ``(..., L)`` -> ``(..., K, L)``."""
        h = self._states(hidden_states)
        low = torch.einsum("...l,klr->...kr", h, self.down)
        return h.unsqueeze(-2) + torch.einsum("...kr,krl->...kl", low, self.up) + self.offset

    def _flat(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flattened gate ``(N, K)``, states ``(N, K, L)`` and ``log alpha - A``  ``(N, K)``."""
        h = self._states(hidden_states).reshape(-1, self.hidden_size)
        states = self.component_states(h)
        N, K, L = states.shape
        A = _LogNormalizer.apply(states.reshape(N * K, L), self.embedding, self.bias, self.chunk_size)
        gate = self.gate_log_weights(h)
        return gate, states, gate - A.view(N, K)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Next-token log-probabilities ``(..., p)`` for hidden states ``(..., L)`` (usable as logits)."""
        _, states, c = self._flat(hidden_states)
        out = _MixtureLogProbs.apply(c, states, self.embedding, self.bias, self.chunk_size)
        return out.view(*hidden_states.shape[:-1], self.vocab_size)

    def log_prob(self, hidden_states: Tensor, targets: Tensor) -> Tensor:
        """``log p(y | h)`` for hidden states ``(..., L)`` and token ids ``(...)``: shape ``(...)``.

        Never builds the ``(..., p)`` output: the cheap way to train (see :meth:`loss`).
        """
        targets = torch.as_tensor(targets)
        if targets.shape != hidden_states.shape[:-1]:
            raise ValueError(
                f"targets must have shape {tuple(hidden_states.shape[:-1])} (hidden_states without its last "
                f"dimension), got {tuple(targets.shape)}"
            )
        y = check_token_ids(targets, self.vocab_size, device=self.embedding.device).reshape(-1)
        _, states, c = self._flat(hidden_states)
        rows = self.embedding.index_select(0, y).to(states.dtype)  # (N, L)
        target_logits = torch.einsum("nkl,nl->nk", states, rows)
        if self.bias is not None:
            target_logits = target_logits + self.bias.index_select(0, y).to(states.dtype)[:, None]
        return torch.logsumexp(c + target_logits, dim=-1).view(hidden_states.shape[:-1])

    def loss(self, hidden_states: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
        """Mean negative log-likelihood per token over the targets that are not ``ignore_index``."""
        targets = torch.as_tensor(targets, device=hidden_states.device)
        keep = targets != ignore_index
        if not bool(keep.any()):
            raise ValueError(f"every target equals ignore_index={ignore_index}; nothing to score")
        return -self.log_prob(hidden_states[keep], targets[keep]).mean()

    # ------------------------------------------------------------------ files
    def fingerprint(self) -> str:
        """The fingerprint of this head's design (see :func:`torch_softmix.io.embedding_fingerprint`)."""
        return embedding_fingerprint(self.embedding, self.bias)

    def _config(self) -> dict:
        return {
            "format": "torch_softmix.mos_head",
            "n_components": self.n_components,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "rank": self.rank,
            "dtype": str(self.offset.dtype).removeprefix("torch."),
            "has_bias": self.bias is not None,
            "embedding_fingerprint": self.fingerprint(),
            "fit": self.fit_info,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the head's parameters (never the embedding) to one safetensors file, atomically."""
        meta = {**self._config(), "fit": json.dumps(self.fit_info, sort_keys=True, default=str)}
        write_mos_file(path, dict(self.named_parameters()), meta)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """A folder with ``mos_head.safetensors`` and ``softmix_config.json``, both written atomically."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.save(folder / WEIGHTS_NAME)
        atomic_write_bytes(folder / CONFIG_NAME, json.dumps(self._config(), indent=1, default=str).encode())

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, embedding: Tensor, bias: Tensor | None = None, **kwargs
    ) -> MixtureOfSoftmaxesHead:
        """Load a folder written by :meth:`save_pretrained` onto ``embedding (p, L)``."""
        path = Path(directory) / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{str(directory)!r} has no {WEIGHTS_NAME}; is it a folder saved by save_pretrained?")
        return cls.load(path, embedding, bias, **kwargs)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        embedding: Tensor,
        bias: Tensor | None = None,
        *,
        check_embedding: bool = True,
        chunk_size: int | None = None,
    ) -> MixtureOfSoftmaxesHead:
        """Load a head written by :meth:`save` onto ``embedding (p, L)`` (refused on another design)."""
        tensors, meta = read_mos_file(path)
        embedding, bias = check_design(embedding, bias)
        if tensors["down"].dim() != 3 or tensors["offset"].dim() != 2:
            raise ValueError(f"{str(path)!r} holds parameters of the wrong rank; the file is not a valid head")
        check_saved_design(path, meta, tensors["offset"].shape[1], embedding, bias, check_embedding)
        K, _, r = tensors["down"].shape
        head = cls(embedding, K, bias, rank=r, dtype=tensors["offset"].dtype, chunk_size=chunk_size)
        try:
            head.load_state_dict(tensors)
        except RuntimeError as err:
            raise ValueError(f"{str(path)!r} holds inconsistent parameter shapes: {err}") from err
        head.fit_info = json.loads(meta.get("fit", "{}"))
        return head
