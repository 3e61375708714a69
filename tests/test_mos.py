"""MixtureOfSoftmaxesHead: exactness at K = 1, chunked gradients, warm start, files, attach, memory."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from torch_softmix import MixtureOfSoftmaxesHead, SoftmaxMixtureHead
from torch_softmix import simulate as sim


def dense_log_probs(head, hidden):
    """The head's law written plainly (the (tokens, K, p) tensor built whole): the reference."""
    logits = head.component_states(hidden) @ head.embedding.to(head.offset.dtype).T
    if head.bias is not None:
        logits = logits + head.bias
    return torch.logsumexp(head.gate_log_weights(hidden)[..., None] + torch.log_softmax(logits, -1), dim=-2)


@pytest.fixture
def random_head():
    torch.manual_seed(0)
    X = torch.randn(53, 6, dtype=torch.float64)
    b = torch.randn(53, dtype=torch.float64)
    head = MixtureOfSoftmaxesHead(X, 3, b, rank=2, chunk_size=7).perturb_(0.5)
    with torch.no_grad():
        head.up.normal_()
    return head


def test_forward_and_log_prob_match_the_dense_formula(random_head):
    hidden = torch.randn(2, 5, 6, dtype=torch.float64)
    y = torch.randint(0, 53, (2, 5))
    out = random_head(hidden)
    assert out.shape == (2, 5, 53)
    torch.testing.assert_close(out, dense_log_probs(random_head, hidden))
    torch.testing.assert_close(random_head.log_prob(hidden, y), out.gather(-1, y[..., None])[..., 0])
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64))


def test_chunked_gradients_match_the_dense_formula(random_head):
    hidden = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randint(0, 53, (4,))
    weights = torch.randn(4, 53, dtype=torch.float64)
    params = list(random_head.parameters())
    for ours, ref in [
        (random_head.log_prob(hidden, y).sum(), dense_log_probs(random_head, hidden).gather(-1, y[:, None]).sum()),
        ((random_head(hidden) * weights).sum(), (dense_log_probs(random_head, hidden) * weights).sum()),
    ]:
        for g1, g2 in zip(torch.autograd.grad(ours, params), torch.autograd.grad(ref, params)):
            torch.testing.assert_close(g1, g2)


def test_one_component_with_zero_adapters_is_the_plain_softmax():
    X, b = torch.randn(40, 5), torch.randn(40)
    hidden = torch.randn(3, 5)
    for K in (1, 3):  # at construction every component is the identity: the base softmax for any K
        head = MixtureOfSoftmaxesHead(X, K, b, chunk_size=9)
        torch.testing.assert_close(head(hidden), torch.log_softmax(hidden @ X.T + b, -1), rtol=0, atol=2e-6)


def test_from_fitted_starts_at_the_fitted_mixture():
    X = sim.gaussian_design(80, 4, seed=0, dtype=torch.float64)
    fitted = SoftmaxMixtureHead(X, 3, alpha=torch.tensor([0.5, 0.3, 0.2]), beta=torch.randn(3, 4, dtype=torch.float64))
    head = MixtureOfSoftmaxesHead.from_fitted(fitted, rank=2)
    torch.testing.assert_close(head.gate_bias.detach(), fitted.log_alpha.detach().log_softmax(0))
    torch.testing.assert_close(head.offset.detach().T @ fitted.alpha.detach(), torch.zeros(4, dtype=torch.float64))
    # at the weighted mean of the atoms, every component state is the fitted atom: the law is the fitted one
    centre = fitted.alpha.detach() @ fitted.beta.detach()
    torch.testing.assert_close(head(centre), fitted.log_probs().detach())
    with pytest.raises(TypeError, match="fitted must be a SoftmaxMixtureHead"):
        MixtureOfSoftmaxesHead.from_fitted(head)


def test_bad_inputs_name_the_argument(random_head):
    with pytest.raises(ValueError, match="hidden_size=6"):
        random_head(torch.randn(2, 5))
    with pytest.raises(ValueError, match="targets must have shape"):
        random_head.log_prob(torch.randn(2, 6, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        random_head.log_prob(torch.randn(2, 6, dtype=torch.float64), torch.tensor([0, 99]))
    with pytest.raises(ValueError, match="ignore_index"):
        random_head.loss(torch.randn(2, 6, dtype=torch.float64), torch.full((2,), -100))
    with pytest.raises(ValueError, match="n_components"):
        MixtureOfSoftmaxesHead(torch.randn(5, 2), 0)
    with pytest.raises(ValueError, match="rank"):
        MixtureOfSoftmaxesHead(torch.randn(5, 2), 2, rank=-1)


def test_save_load_round_trip_and_refusals(random_head, tmp_path):
    hidden = torch.randn(3, 6, dtype=torch.float64)
    random_head.save_pretrained(tmp_path / "h")
    config = json.loads((tmp_path / "h" / "softmix_config.json").read_text())
    assert config["format"] == "torch_softmix.mos_head" and config["rank"] == 2
    loaded = MixtureOfSoftmaxesHead.from_pretrained(tmp_path / "h", random_head.embedding, random_head.bias, chunk_size=7)
    torch.testing.assert_close(loaded(hidden), random_head(hidden), rtol=0, atol=0)
    with pytest.raises(ValueError, match="different embedding"):
        MixtureOfSoftmaxesHead.from_pretrained(tmp_path / "h", random_head.embedding + 1, random_head.bias)
    with pytest.raises(ValueError, match="bias"):
        MixtureOfSoftmaxesHead.from_pretrained(tmp_path / "h", random_head.embedding)
    with pytest.raises(ValueError, match="not a torch_softmix mixture-of-softmaxes head"):
        SoftmaxMixtureHead(random_head.embedding, 2).save(tmp_path / "u.safetensors")
        MixtureOfSoftmaxesHead.load(tmp_path / "u.safetensors", random_head.embedding)


def test_format_doc_matches_the_file(random_head, tmp_path):
    random_head.save(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as fh:
        found = set(fh.metadata()) | set(fh.keys())
    text = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text()
    body = text.split("## Conditional head file")[1].split("\n## ")[0]
    assert found == set(re.findall(r"^\| `([a-zA-Z_0-9]+)` \|", body, flags=re.M))


def test_three_components_beat_one_on_a_three_component_task():
    """Contexts whose true next-token law is a 3-component mixture: K = 3 reaches a lower held-out loss."""
    g = torch.Generator().manual_seed(0)
    p, L, n = 60, 8, 3000
    X = torch.randn(p, L, generator=g)
    true_gate = torch.randn(3, L, generator=g) * 2
    true_offsets = torch.randn(3, L, generator=g) * 2.5

    def draw(m):
        h = torch.randn(m, L, generator=g) * 0.5
        gate = torch.softmax(h @ true_gate.T, -1)
        k = torch.multinomial(gate, 1, generator=g)[:, 0]
        law = torch.softmax((h + true_offsets[k]) @ X.T, -1)
        return h, torch.multinomial(law, 1, generator=g)[:, 0]

    (h_train, y_train), (h_val, y_val) = draw(n), draw(n)
    losses = {}
    for K in (1, 3):
        torch.manual_seed(1)
        head = MixtureOfSoftmaxesHead(X, K, rank=4, chunk_size=16).perturb_(0.3)
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(300):
            idx = torch.randint(0, n, (256,))
            opt.zero_grad()
            head.loss(h_train[idx], y_train[idx]).backward()
            opt.step()
        with torch.no_grad():
            losses[K] = float(head.loss(h_val, y_val))
    assert losses[3] < losses[1] - 0.05, losses


PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from torch_softmix import MixtureOfSoftmaxesHead
    torch.manual_seed(0)
    p, L, K, T, rows = 40000, 64, 4, 1024, 1024
    X = torch.randn(p, L)
    head = MixtureOfSoftmaxesHead(X, K, rank=4, chunk_size=rows, validate_args=False).perturb_(0.1)
    hidden, y = torch.randn(T, L), torch.randint(0, p, (T,))
    head.loss(hidden[:8], y[:8]).backward()  # warm the allocator and autograd
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    head.zero_grad()
    head.loss(hidden, y).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak - base, T * K * rows * 4 * 4, T * K * p * 4)
    """
)


def test_peak_memory_of_forward_and_backward_stays_within_the_stated_bound():
    """Peak memory (RSS) of loss + backward over 1024 tokens of a 40000-token vocabulary, K = 4: within
    4 · K · chunk_size floats per token (plus 8 MiB of slack), a tenth of one (tokens × K × p) tensor.

    glibc is told to serve large blocks by mmap (fixed threshold), so that freed blocks go back to the
    system and the peak RSS follows the live tensors rather than the heap's high-water mark."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    grew, bound, dense = map(int, out.stdout.split())
    assert grew <= bound + (8 << 20), (grew, bound)
    assert bound + (8 << 20) < dense / 8
