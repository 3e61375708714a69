"""Reliability: bad input gets clear errors, files survive kills, fits resume bit-exactly, formats match the doc."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from torch_softmix import EMFitter, SoftmaxMixtureHead
from torch_softmix import simulate as sim
from torch_softmix.data import as_counts
from torch_softmix.io import read_shard, write_shard

P, L = 60, 3
X = sim.gaussian_design(P, L, seed=0, dtype=torch.float64)
TRUTH = sim.random_mixture(2, L, norm=1.5, seed=1)
COUNTS = sim.sample_counts(sim.make_head(X, TRUTH), 5000, seed=2)
ROOT = Path(__file__).resolve().parents[1]


def _fit(**kw):
    data = kw.pop("data", {"counts": COUNTS})
    design = kw.pop("design", X)
    bias = kw.pop("bias", None)
    K = kw.pop("K", 2)
    return EMFitter(K, max_iter=5, **kw).fit(design, bias=bias, **data)


def _with_nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    head = SoftmaxMixtureHead(X, 2, alpha=TRUTH["alpha"], beta=TRUTH["beta"])
    good = d / "good.safetensors"
    head.save(good)
    torn = d / "torn.safetensors"
    torn.write_bytes(good.read_bytes()[:-40])
    future = d / "future.safetensors"
    save_file(
        {"log_alpha": torch.zeros(2), "beta": torch.zeros(2, L)},
        str(future),
        metadata={"format": "torch_softmix.head", "format_version": "99"},
    )
    foreign = d / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    shard = d / "shard.safetensors"
    write_shard(shard, torch.tensor([1, 2, 3]), {"embedding_fingerprint": "a" * 32})
    ckpt = d / "ckpt.safetensors"
    ckpt.write_bytes(b"not a checkpoint")
    other_ckpt = d / "other.safetensors"
    EMFitter(2, init=TRUTH, max_iter=4, checkpoint=other_ckpt, checkpoint_every=1).fit(X, counts=COUNTS)
    return {
        "dir": d,
        "good": good,
        "torn": torn,
        "future": future,
        "foreign": foreign,
        "shard": shard,
        "ckpt": ckpt,
        "other_ckpt": other_ckpt,
        "head": head,
    }


BAD_INPUTS = [
    # data
    ("token id too large", lambda f: as_counts(torch.tensor([0, P]), None, P), ValueError, r"outside \[0, 60\)"),
    ("negative token id", lambda f: as_counts(torch.tensor([-1]), None, P), ValueError, "id -1"),
    ("float tokens", lambda f: as_counts(torch.tensor([1.0]), None, P), TypeError, "integer tensor"),
    ("NaN counts", lambda f: as_counts(None, _with_nan(torch.ones(P)), P), ValueError, "NaN"),
    ("negative counts", lambda f: as_counts(None, -torch.ones(P), P), ValueError, "non-negative"),
    ("counts of wrong length", lambda f: as_counts(None, torch.ones(P + 1), P), ValueError, "length 61"),
    ("2-D counts", lambda f: as_counts(None, torch.ones(2, P), P), ValueError, "1-D"),
    ("no tokens", lambda f: as_counts(torch.zeros(0, dtype=torch.long), None, P), ValueError, "empty"),
    ("all-zero counts", lambda f: as_counts(None, torch.zeros(P), P), ValueError, "empty"),
    (
        "tokens and counts",
        lambda f: _fit(data={"tokens": torch.tensor([1]), "counts": COUNTS}),
        ValueError,
        "exactly one",
    ),
    ("neither tokens nor counts", lambda f: _fit(data={}), ValueError, "exactly one"),
    # design
    ("1-D embedding", lambda f: _fit(design=torch.ones(P)), ValueError, "2-D"),
    ("integer embedding", lambda f: _fit(design=torch.ones(P, L, dtype=torch.long)), TypeError, "floating"),
    ("list embedding", lambda f: _fit(design=[[1.0]]), TypeError, "torch.Tensor"),
    ("NaN in embedding", lambda f: _fit(design=_with_nan(X)), ValueError, "NaN or infinite"),
    ("inf in bias", lambda f: _fit(bias=torch.full((P,), float("inf"))), ValueError, "bias contains NaN"),
    ("bias of wrong shape", lambda f: _fit(bias=torch.zeros(P + 1)), ValueError, "bias must be a tensor of shape"),
    # fitter settings
    ("K = 0", lambda f: _fit(K=0), ValueError, "n_components must be an int >= 1"),
    ("K not an int", lambda f: _fit(K=2.5), ValueError, "n_components must be an int >= 1"),
    (
        "K above tokens seen",
        lambda f: _fit(K=3, data={"tokens": torch.tensor([1, 2])}),
        ValueError,
        "distinct tokens seen",
    ),
    ("negative tol", lambda f: _fit(tol=-1.0), ValueError, "tol must be"),
    ("NaN tol", lambda f: _fit(tol=float("nan")), ValueError, "tol must be"),
    (
        "max_iter = 0",
        lambda f: EMFitter(2, max_iter=0).fit(X, counts=COUNTS),
        ValueError,
        "max_iter must be",
    ),
    ("negative ridge", lambda f: _fit(ridge=-1.0), ValueError, "ridge must be"),
    ("boolean ridge", lambda f: _fit(ridge=True), ValueError, "ridge must be"),
    ("unknown m_step", lambda f: _fit(m_step="lbfgs"), ValueError, "m_step must be one of"),
    ("unknown init", lambda f: _fit(init="kmeans++"), ValueError, "init must be one of"),
    (
        "init of wrong shape",
        lambda f: _fit(init={"alpha": torch.ones(3), "beta": torch.zeros(3, L)}),
        ValueError,
        "init must hold",
    ),
    ("init without beta", lambda f: _fit(init={"alpha": torch.ones(2)}), ValueError, "lacks"),
    (
        "negative init weight",
        lambda f: _fit(init={"alpha": torch.tensor([-1.0, 2.0]), "beta": torch.zeros(2, L)}),
        ValueError,
        "alpha must be finite",
    ),
    ("half compute dtype", lambda f: _fit(dtype=torch.float16), ValueError, "dtype must be"),
    ("bad random_state", lambda f: _fit(random_state="seed"), TypeError, "random_state"),
    ("n_init = 0", lambda f: _fit(n_init=0), ValueError, "n_init must be"),
    ("unknown device", lambda f: _fit(device="tpu:9"), ValueError, "not a torch device"),
    # head
    ("head with K = 0", lambda f: SoftmaxMixtureHead(X, 0), ValueError, "n_components"),
    ("negative sample size", lambda f: f["head"].sample(-1), ValueError, "non-negative int"),
    ("float tokens to log_prob", lambda f: f["head"].log_prob(torch.tensor([0.5])), TypeError, "integer tensor"),
    ("token out of range to log_prob", lambda f: f["head"].log_prob(torch.tensor([P])), ValueError, "must lie in"),
    (
        "beta of wrong shape",
        lambda f: f["head"].set_parameters(beta=torch.zeros(3, L)),
        ValueError,
        "beta must have shape",
    ),
    # files
    ("truncated head file", lambda f: SoftmaxMixtureHead.load(f["torn"], X), ValueError, "truncated or corrupt"),
    ("future format version", lambda f: SoftmaxMixtureHead.load(f["future"], X), ValueError, "upgrade torch_softmix"),
    (
        "head on another embedding",
        lambda f: SoftmaxMixtureHead.load(f["good"], X * 1.01),
        ValueError,
        "different embedding",
    ),
    ("not a head file", lambda f: SoftmaxMixtureHead.load(f["foreign"], X), ValueError, "not a torch_softmix head"),
    (
        "missing head folder config",
        lambda f: SoftmaxMixtureHead.from_pretrained(f["dir"], X),
        FileNotFoundError,
        "softmix_config.json",
    ),
    (
        "shard of another model",
        lambda f: read_shard(f["shard"], expect_fingerprint="b" * 32),
        ValueError,
        "another model",
    ),
    (
        "corrupt checkpoint",
        lambda f: EMFitter(2, init="random", checkpoint=f["ckpt"]).fit(X, counts=COUNTS),
        ValueError,
        "not a readable checkpoint",
    ),
    (
        "checkpoint of another fit",
        lambda f: EMFitter(2, init="random", ridge=1e-3, checkpoint=f["other_ckpt"]).fit(X, counts=COUNTS),
        ValueError,
        "belongs to another fit",
    ),
]


@pytest.mark.parametrize("name, call, exc, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_clearly(name, call, exc, message, files):
    assert len(BAD_INPUTS) >= 30
    with pytest.raises(exc, match=message):
        call(files)


def test_cuda_device_without_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CUDA is not available"):
        _fit(device="cuda")


# ---------------------------------------------------------------------- properties
@st.composite
def problems(draw):
    p = draw(st.integers(5, 40))
    dim = draw(st.integers(1, 4))
    K = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 10_000))
    norm = draw(st.floats(0.1, 6.0))
    X = sim.gaussian_design(p, dim, seed=seed, dtype=torch.float64)
    truth = sim.random_mixture(K, dim, norm=norm, seed=seed + 1)
    return X, truth, seed


@settings(max_examples=25, deadline=None, derandomize=True)
@given(problems())
def test_property_log_probs_sum_to_one_and_files_round_trip(tmp_path_factory, problem):
    X, truth, _ = problem
    head = sim.make_head(X, truth)
    total = float(head.log_probs().detach().exp().sum())
    assert abs(total - 1.0) < 1e-12
    path = tmp_path_factory.mktemp("prop") / "h.safetensors"
    head.save(path)
    back = SoftmaxMixtureHead.load(path, X)
    assert torch.equal(back.beta, head.beta) and torch.equal(back.log_alpha, head.log_alpha)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(problems(), st.sampled_from([0.0, 1e-6, 1e-3]), st.sampled_from([None, "squarem"]))
def test_property_em_never_decreases(problem, ridge, accelerate):
    X, truth, seed = problem
    K = truth["beta"].shape[0]
    counts = sim.sample_counts(sim.make_head(X, truth), 2000, seed=seed)
    if int((counts > 0).sum()) < K:
        return
    fitter = EMFitter(K, init="random", random_state=seed, ridge=ridge, accelerate=accelerate, max_iter=25, tol=0)
    fitter.fit(X, counts=counts)
    obj = np.array([h["objective"] for h in fitter.history_])
    assert np.all(np.diff(obj) >= -1e-12 * np.maximum(1.0, np.abs(obj[:-1])))


# ---------------------------------------------------------------------- kills and resumes
WRITER = """
import sys, torch
from torch_softmix.io import write_shard
path, n = sys.argv[1], int(sys.argv[2])
tokens = torch.arange(n, dtype=torch.int64) % 1000
print("ready", flush=True)
while True:
    write_shard(path, tokens, {"embedding_fingerprint": "big"})
"""


def test_killed_writer_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "shard.safetensors"
    write_shard(path, torch.tensor([7, 8, 9]), {"embedding_fingerprint": "small"})
    for delay in (0.05, 0.2, 0.45):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(40_000_000)], stdout=subprocess.PIPE, cwd=ROOT
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        tokens, meta = read_shard(path)  # always a whole file: the small one or a complete big one
        assert meta["embedding_fingerprint"] in ("small", "big")
        assert tokens.numel() == (3 if meta["embedding_fingerprint"] == "small" else 40_000_000)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != path.name]
    assert all(name.endswith(".tmp") for name in leftovers)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("m_step", ["newton", "newton-cg"])  # newton-cg: its preconditioner is rebuilt on resume
def test_interrupted_fit_resumes_to_the_same_result(tmp_path, monkeypatch, m_step):
    from torch_softmix import Design, curvature

    Xb = sim.gaussian_design(2000, 6, seed=3, dtype=torch.float64)
    assert curvature.usable(Design(Xb), 3)  # newton-cg takes the block-preconditioned path here
    truth = sim.random_mixture(3, 6, norm=2.0, separation=1.0, seed=4)
    counts = sim.sample_counts(sim.make_head(Xb, truth), 50_000, seed=5)
    kw = dict(init="subspace", n_init=3, init_max_iter=3, random_state=0, max_iter=40, tol=0, m_step=m_step)
    straight = EMFitter(3, **kw)
    ref = straight.fit(Xb, counts=counts)

    ckpt = tmp_path / "fit.ckpt"
    interrupted = EMFitter(3, checkpoint=ckpt, checkpoint_every=2, **kw)
    saves = []

    def crash_after_third_checkpoint(event):
        if event.checkpoint_written:
            saves.append(event.n_iter)
            if len(saves) == 2:
                raise _Interrupt  # the process "dies" right after its second checkpoint (mid-way between rebuilds of the preconditioner)

    with pytest.raises(_Interrupt):
        interrupted.fit(Xb, counts=counts, callback=crash_after_third_checkpoint)
    assert ckpt.exists()

    import torch_softmix.em as em_module

    made = []  # a counting wrapper around the real start maker
    real_make_starts = em_module.make_starts
    monkeypatch.setattr(em_module, "make_starts", lambda *a, **k: made.append(1) or real_make_starts(*a, **k))
    resumed = EMFitter(3, checkpoint=ckpt, checkpoint_every=2, **kw)
    head = resumed.fit(Xb, counts=counts)
    assert made == []  # the checkpoint is read before any start is computed
    assert torch.equal(head.beta, ref.beta) and torch.equal(head.log_alpha, ref.log_alpha)
    assert resumed.n_iter_ == straight.n_iter_
    assert [h["objective"] for h in resumed.history_] == [h["objective"] for h in straight.history_]
    assert resumed.init_names_ == straight.init_names_


def test_same_seed_same_everything_on_cpu():
    a = EMFitter(2, init="subspace", n_init=3, random_state=11).fit(X, counts=COUNTS)
    b = EMFitter(2, init="subspace", n_init=3, random_state=11).fit(X, counts=COUNTS)
    assert torch.equal(a.beta, b.beta)
    g = [torch.Generator().manual_seed(5) for _ in range(2)]
    assert torch.equal(a.sample(1000, generator=g[0]), a.sample(1000, generator=g[1]))


# ---------------------------------------------------------------------- numerical robustness
def test_peaked_atoms_large_vocab_and_half_precision():
    p, dim = 262_144, 8
    Xh = sim.gaussian_design(p, dim, seed=7).to(torch.bfloat16)
    truth = sim.random_mixture(2, dim, norm=100.0, seed=8)  # very peaked laws
    head = sim.make_head(Xh, truth)
    assert head.beta.dtype == torch.float32 and head.embedding.dtype == torch.bfloat16
    counts = sim.sample_counts(head, 100_000, seed=9)
    fitter = EMFitter(2, init="random", n_init=2, random_state=0, max_iter=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fitter.fit(Xh, counts=counts)
    # float32 logits of norm-100 atoms round at ~1e-9 per token: not reported as a loss of EM
    assert not [w for w in caught if "decreased" in str(w.message)]
    assert fit.embedding.data_ptr() == Xh.data_ptr()  # no float32 copy of the design
    assert torch.isfinite(fit.beta).all() and torch.isfinite(fit.log_alpha).all()
    obj = np.array([h["objective"] for h in fitter.history_])
    assert np.all(np.isfinite(obj)) and np.all(np.diff(obj) >= -1e-9)


def test_collapsing_and_single_token_components_stay_finite():
    j = int(X.norm(dim=1).argmax())  # a vertex of the convex hull: its probability can approach 1
    other = (j + 1) % P
    counts = torch.zeros(P, dtype=torch.long)
    counts[j] = 1000  # a component owns one token; the other has almost nothing to explain
    counts[other] = 1
    fitter = EMFitter(2, init="random", random_state=0, max_iter=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a collapse is reported by a warning, checked below when it happens
        head = fitter.fit(X, counts=counts)
    assert torch.isfinite(head.beta).all() and torch.isfinite(head.log_alpha).all()
    assert head.fit_info["collapsed"] == fitter.collapsed_
    assert all(float(head.alpha[k]) < 1e-8 for k in fitter.collapsed_)
    assert float(head.log_probs().detach()[j].exp()) > 0.5
    obj = np.array([h["objective"] for h in fitter.history_])
    assert np.all(np.diff(obj) >= -1e-12)


# ---------------------------------------------------------------------- the documented format
def _doc_keys(section: str) -> set[str]:
    text = (ROOT / "docs" / "format.md").read_text()
    body = text.split(f"## {section}")[1].split("\n## ")[0]
    return set(re.findall(r"^\| `([a-zA-Z_0-9]+)` \|", body, flags=re.M))


def test_format_doc_matches_the_files(tmp_path, files):
    from safetensors import safe_open

    def keys(path):
        with safe_open(str(path), framework="pt") as fh:
            return set(fh.metadata()), set(fh.keys())

    meta, tensors = keys(files["good"])
    assert meta | tensors == _doc_keys("Head file")
    files["head"].save_pretrained(tmp_path / "folder")
    config = json.loads((tmp_path / "folder" / "softmix_config.json").read_text())
    assert set(config) == _doc_keys("Folder form")
    assert SoftmaxMixtureHead.from_pretrained(tmp_path / "folder", X).n_components == 2
    write_shard(
        tmp_path / "s.safetensors",
        torch.tensor([1]),
        {"embedding_fingerprint": "x", "model": "{}", "sampler": "{}", "component": 0, "shard": 0},
    )
    meta, tensors = keys(tmp_path / "s.safetensors")
    assert (meta | tensors) <= _doc_keys("Token shard") and "batch" in _doc_keys("Token shard")
    meta, tensors = keys(files["other_ckpt"])
    assert meta | tensors == _doc_keys("Fit checkpoint")
    state = json.loads(dict(safe_open(str(files["other_ckpt"]), framework="pt").metadata())["state"])
    doc = (ROOT / "docs" / "format.md").read_text().split("## Fit checkpoint")[1]
    for key in ("n_maps", "history", "embedding_fingerprint", "counts_sha256", "settings", "dtype"):
        assert key in state and f"`{key}`" in doc
    assert os.path.exists(files["good"])
