"""Files: the head's safetensors format, embedding fingerprints and atomic writes.

A head file holds the fitted parameters only (``log_alpha (K,)``, ``beta (K, L)``); the
embedding it belongs to is identified by a fingerprint, never stored. Metadata is
safetensors' ``str -> str`` map (see ``docs/format.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _st_save
from torch import Tensor

FORMAT_NAME = "torch_softmix.head"
FORMAT_VERSION = 1
#: Rows of the embedding read by the fingerprint (evenly spaced, always the first and last).
FINGERPRINT_ROWS = 1024


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, flushed and renamed.

    A crash or kill mid-write leaves the previous file (if any) untouched, never a torn one.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: the folder {str(folder)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable where the platform allows it
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def embedding_fingerprint(embedding: Tensor, bias: Tensor | None = None) -> str:
    """A short hex digest identifying a design ``X (p, L)`` (and bias ``b (p,)``).

    It hashes the shape and up to :data:`FINGERPRINT_ROWS` evenly spaced rows, exactly, as
    float32 bytes: cheap for a gigabyte matrix, identical on CPU and CUDA and for float32 /
    bfloat16 copies that hold the same values, and different for another model's embedding.
    """
    p, L = embedding.shape
    idx = torch.linspace(0, p - 1, min(p, FINGERPRINT_ROWS), dtype=torch.float64).round().long().unique()
    h = hashlib.sha256()
    h.update(f"{p}x{L}".encode())
    rows = (
        embedding.detach().index_select(0, idx.to(embedding.device)).to(device="cpu", dtype=torch.float32).contiguous()
    )
    h.update(rows.numpy().tobytes())
    if bias is not None:
        h.update(b"bias")
        h.update(bias.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _write(path: str | os.PathLike, fmt: str, version: int, tensors: dict[str, Tensor], metadata: dict) -> None:
    """Atomically write ``tensors`` with the format's name and version and ``metadata`` (JSON unless ``str``)."""
    meta = {"format": fmt, "format_version": str(version)}
    for key, value in metadata.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    atomic_write_bytes(
        path, _st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=meta)
    )


def _read(
    path: str | os.PathLike, fmt: str, version: int, what: str, required: tuple[str, ...]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a file written by :func:`_write`, checking its format, version and ``required`` tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{str(path)!r} is not a readable {what} (truncated or corrupt?): {err}") from err
    if meta.get("format") != fmt:
        raise ValueError(f"{str(path)!r} is not a torch_softmix {what} (metadata format={meta.get('format')!r})")
    try:
        found = int(meta.get("format_version", ""))
    except ValueError:
        raise ValueError(f"{str(path)!r} has an unreadable format_version {meta.get('format_version')!r}") from None
    if found > version:
        raise ValueError(
            f"{str(path)!r} uses {what} format version {found}, newer than this torch_softmix reads "
            f"(version {version}); upgrade torch_softmix"
        )
    for name in required:
        if name not in tensors:
            raise ValueError(f"{str(path)!r} lacks the tensor {name!r}; the file is incomplete")
    return tensors, meta


def write_head_file(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, object]) -> None:
    """Atomically write a head's ``tensors`` with ``metadata`` (values JSON-encoded unless already ``str``)."""
    _write(path, FORMAT_NAME, FORMAT_VERSION, tensors, metadata)


def read_head_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a head file written by :func:`write_head_file`, checking its format and version."""
    return _read(path, FORMAT_NAME, FORMAT_VERSION, "head", ("log_alpha", "beta"))


MOS_FORMAT = "torch_softmix.mos_head"
MOS_VERSION = 1
MOS_TENSORS = ("gate_weight", "gate_bias", "down", "up", "offset")


def write_mos_file(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, object]) -> None:
    """Atomically write a :class:`~torch_softmix.mos.MixtureOfSoftmaxesHead`'s parameters with ``metadata``."""
    _write(path, MOS_FORMAT, MOS_VERSION, tensors, metadata)


def read_mos_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a file written by :func:`write_mos_file`, checking its format, version and tensors."""
    return _read(path, MOS_FORMAT, MOS_VERSION, "mixture-of-softmaxes head", MOS_TENSORS)


def file_format(path: str | os.PathLike) -> str | None:
    """The ``format`` recorded in a safetensors file's metadata (``None`` when there is none)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def check_saved_design(
    path: str | os.PathLike,
    meta: dict[str, str],
    hidden_size: int,
    embedding: Tensor,
    bias: Tensor | None,
    check_embedding: bool,
) -> None:
    """Refuse to load a head saved for another design: sizes, bias presence and (optionally) fingerprint."""
    p, L = embedding.shape
    if int(meta.get("vocab_size", p)) != p or hidden_size != L:
        raise ValueError(
            f"{str(path)!r} was fitted on an embedding of shape ({meta.get('vocab_size')}, {hidden_size}), "
            f"but the embedding given has shape ({p}, {L})"
        )
    if json.loads(meta.get("has_bias", "false")) != (bias is not None):
        raise ValueError(
            f"{str(path)!r} was fitted {'with' if bias is None else 'without'} an output bias; "
            f"pass bias={'the model bias' if bias is None else 'None'}"
        )
    if check_embedding and meta.get("embedding_fingerprint") != embedding_fingerprint(embedding, bias):
        raise ValueError(
            f"{str(path)!r} was fitted on a different embedding (fingerprint {meta.get('embedding_fingerprint')} "
            f"!= {embedding_fingerprint(embedding, bias)}); load it onto the model it was fitted on, "
            "or pass check_embedding=False if you know the designs agree"
        )


SHARD_FORMAT = "torch_softmix.shard"
SHARD_VERSION = 1


def write_shard(path: str | os.PathLike, tokens: Tensor, metadata: dict[str, object]) -> None:
    """Atomically write a token shard: tensor ``tokens (n,)`` (int32 when the ids fit, else int64) and metadata."""
    tokens = tokens.detach().reshape(-1).to("cpu")
    dtype = torch.int32 if tokens.numel() == 0 or int(tokens.max()) < 2**31 - 1 else torch.int64
    _write(
        path, SHARD_FORMAT, SHARD_VERSION, {"tokens": tokens.to(dtype)}, {"n_tokens": str(tokens.numel()), **metadata}
    )


def read_shard(path: str | os.PathLike, expect_fingerprint: str | None = None) -> tuple[Tensor, dict[str, str]]:
    """Read a token shard; with ``expect_fingerprint``, refuse a shard sampled from another model."""
    tensors, meta = _read(path, SHARD_FORMAT, SHARD_VERSION, "token shard", ("tokens",))
    tokens = tensors["tokens"]
    if int(meta.get("n_tokens", tokens.numel())) != tokens.numel():
        raise ValueError(f"{str(path)!r} holds {tokens.numel()} tokens but its metadata says {meta['n_tokens']}")
    if expect_fingerprint is not None and meta.get("embedding_fingerprint") != expect_fingerprint:
        raise ValueError(
            f"{str(path)!r} was sampled from another model (embedding fingerprint {meta.get('embedding_fingerprint')} "
            f"!= {expect_fingerprint}); fit it with the model that produced it"
        )
    return tokens.long(), meta


def read_shard_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a token shard, without reading its tokens."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{str(path)!r} is not a readable token shard (truncated or corrupt?): {err}") from err
    if meta.get("format") != SHARD_FORMAT:
        raise ValueError(f"{str(path)!r} is not a torch_softmix token shard (metadata format={meta.get('format')!r})")
    return meta


CHECKPOINT_FORMAT = "torch_softmix.checkpoint"
CHECKPOINT_VERSION = 1


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, object]) -> None:
    """Atomically write a fit checkpoint: state tensors and JSON metadata (history, settings, keys)."""
    _write(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, tensors, {"state": json.dumps(metadata)})


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint written by :func:`write_checkpoint`."""
    tensors, meta = _read(
        path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "checkpoint", ("log_alpha", "beta")
    )
    return tensors, json.loads(meta["state"])
