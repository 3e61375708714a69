"""The softmix command end to end in a temporary folder: sample -> fit -> eval -> inspect -> generate."""

import json

import pytest

pytest.importorskip("transformers")

from torch_softmix.cli import main  # noqa: E402

from .tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_model("llama", tmp_path_factory.mktemp("cli_llama")))


def test_sample_fit_eval_inspect(model_dir, tmp_path, capsys):
    shards, heldout, head = tmp_path / "shards", tmp_path / "heldout", tmp_path / "head.safetensors"
    common = ["--model", model_dir, "--quiet"]
    prompts = ["--prompt", "hello world", "--prompt", "the cat sat on"]
    assert (
        main(["sample", *common, *prompts, "--weights", "0.7", "0.3", "--n-tokens", "30000", "--out", str(shards)]) == 0
    )
    assert (
        main(
            [
                "sample",
                *common,
                *prompts,
                "--weights",
                "0.7",
                "0.3",
                "--n-tokens",
                "30000",
                "--seed",
                "1",
                "--out",
                str(heldout),
            ]
        )
        == 0
    )
    assert main(["fit", *common, "--shards", str(shards), "-K", "2", "--n-init", "5", "--out", str(head)]) == 0
    assert head.is_file()
    capsys.readouterr()
    assert main(["eval", *common, "--head", str(head), "--shards", str(heldout), "--truth", str(shards)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 30000 and report["bic"] > 0
    assert report["loglik_per_token"] > report["true_loglik_per_token"] - 0.01
    assert report["tv"] < 0.05
    assert main(["inspect", *common, "--head", str(head), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("component") == 2 and "weight" in out
    assert main(["generate", *common, "--head", str(head), "--prompt", "hello", "-n", "2", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("'hello' -> ") for line in lines)


def test_stream_mode(model_dir, tmp_path):
    assert (
        main(
            [
                "sample",
                "--model",
                model_dir,
                "--quiet",
                "--prompt",
                "hello",
                "--mode",
                "stream",
                "--n-sequences",
                "4",
                "--max-new-tokens",
                "5",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "--shards", "/nonexistent", "-K", "2", "--out", "h.safetensors"], "does not exist"),
        (["sample", "--out", "x"], "at least one --prompt"),
        (["eval", "--head", "/nonexistent.safetensors", "--shards", "/tmp"], "does not exist"),
        (["fit", "--model", "/nonexistent-model-dir", "--shards", "/tmp", "-K", "2", "--out", "h"], "cannot load"),
    ],
)
def test_user_errors_exit_2_without_traceback(argv, message, capsys, model_dir):
    argv = [a if a != "MODEL" else model_dir for a in argv]
    if "--model" not in argv:
        argv = [argv[0], "--model", model_dir, *argv[1:]]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_k_is_reported(model_dir, tmp_path, capsys):
    main(
        [
            "sample",
            "--model",
            model_dir,
            "--quiet",
            "--prompt",
            "hello world",
            "--n-tokens",
            "100",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert (
        main(
            [
                "fit",
                "--model",
                model_dir,
                "--quiet",
                "--shards",
                str(tmp_path / "s"),
                "-K",
                "0",
                "--out",
                str(tmp_path / "h.safetensors"),
            ]
        )
        == 2
    )
    assert "n_components" in capsys.readouterr().err


def test_eval_with_truth_loads_the_model_once(model_dir, tmp_path, monkeypatch, capsys):
    from torch_softmix import hf

    shards, head = tmp_path / "s", tmp_path / "h.safetensors"
    common = ["--model", model_dir, "--quiet"]
    assert main(["sample", *common, "--prompt", "hello world", "--n-tokens", "2000", "--out", str(shards)]) == 0
    assert main(["fit", *common, "--shards", str(shards), "-K", "1", "--n-init", "1", "--out", str(head)]) == 0
    loads = []
    real_load = hf.load_model
    monkeypatch.setattr(hf, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    capsys.readouterr()
    assert main(["eval", *common, "--head", str(head), "--shards", str(shards), "--truth", str(shards)]) == 0
    assert len(loads) == 1
    torch = pytest.importorskip("torch")
    torch.manual_seed(7)
    state = torch.get_rng_state()
    assert main(["generate", *common, "--head", str(head), "--prompt", "hello", "--max-new-tokens", "2"]) == 0
    assert torch.equal(torch.get_rng_state(), state)  # generate seeds its own stream, not the caller's
