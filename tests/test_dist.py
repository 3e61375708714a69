"""Vocabulary-parallel fits and data-parallel sampling on several processes (gloo, CPU), against one process."""

import os
import re
import time

import pytest
import torch

from torch_softmix.dist import Comm, row_range

from . import dist_worker as dw

FIT_TASKS = ["given", "default", "kmeans", "random-newton", "large-vocab", "moves"]


def test_row_ranges_cover_the_vocabulary_unevenly():
    for p, world in [(1001, 2), (1001, 3), (7, 4), (3, 3)]:
        ranges = [row_range(p, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == p
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(h - lo for lo, h in ranges) - min(h - lo for lo, h in ranges) <= 1


@pytest.fixture(scope="module")
def reference():
    return dw.run_tasks(Comm(), FIT_TASKS + ["count"], {})


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from .tiny_models import build_tiny_model

    return str(build_tiny_model("llama", tmp_path_factory.mktemp("dist_llama")))


@pytest.mark.parametrize("world_size", [2, 3])
def test_several_processes_fit_as_one_and_sample_the_same_counts(world_size, reference, tiny_model_dir, tmp_path):
    args = {"out_dir": str(tmp_path), "model_dir": tiny_model_dir}
    results = dw.launch(world_size, FIT_TASKS + ["seedless", "top_token", "count", "sample"], args)
    assert all(r is not None for r in results), "a rank did not finish"
    for name in FIT_TASKS:
        ref = reference[name]
        for rank, res in enumerate(results):
            got = res[name]
            assert got["init_names"] == ref["init_names"], (name, rank)
            if ref["moves"] is not None:  # the same moves tried and kept on every rank as in one process
                assert {k: got["moves"][k] for k in ("rounds", "tried", "kept")} == {
                    k: ref["moves"][k] for k in ("rounds", "tried", "kept")}, (name, rank)  # fmt: skip
            torch.testing.assert_close(got["beta"], ref["beta"], rtol=1e-6, atol=1e-9, msg=f"{name} rank {rank}")
            torch.testing.assert_close(got["log_alpha"], ref["log_alpha"], rtol=1e-6, atol=1e-9)
            assert got["objective"] == pytest.approx(ref["objective"], rel=1e-9)
    assert reference["moves"]["moves"]["kept"] >= 1  # the moves task leaves its start's basin by a move
    # the "peak" split's top token over all ranks: the one a single process finds (ties: the smallest id), on
    # every rank
    single = dw.run_tasks(Comm(), ["top_token"], {})["top_token"]
    assert single == [96, 0]
    for case, want in enumerate(single):
        assert [res["top_token"][case] for res in results] == [want] * world_size
    # random_state=None: rank 0's fresh seed on every rank, so all ranks fit the same starts (not a mixture of them)
    seedless = [res["seedless"] for res in results]
    for got in seedless[1:]:
        assert got["init_results"] == seedless[0]["init_results"]
        torch.testing.assert_close(got["beta"], seedless[0]["beta"], rtol=0, atol=0)
    assert seedless[0]["objective"] == pytest.approx(reference["default"]["objective"], abs=1e-6)
    # the same collectives per EM iteration whatever p: sizes are those of the parameters
    K, L = dw.K, dw.L
    per_iter = results[0]["count"]
    for p in (1001, 4003):
        for how in ("apart", "fused"):
            for it in per_iter[p][how]:
                sizes = {name: b // max(c, 1) for name, (c, b) in it.items() if c}
                if how == "fused":  # the E-step's all-reduce carries the M-step's softmax means too
                    assert it["e_step"][0] == 1 and sizes["e_step"] == 8 * (1 + K + 2 * K * L)
                    assert "softmax_mean" not in it
                else:  # L below kernels.FUSE_MIN_WIDTH: the means are all-reduced on their own
                    assert it["e_step"][0] == 1 and sizes["e_step"] == 8 * (1 + K + K * L)
                    assert it["softmax_mean"][0] == 1 and sizes["softmax_mean"] == 8 * K * L
                # the block preconditioner built at the first M-step replaces the diagonal one (no cg_diag)
                assert "cg_diag" not in sizes and sizes["cg_matvec"] == 8 * K * L
                assert sizes["A:max"] == sizes["A:sum"] == 8 * K and it["A:max"][0] == it["A:sum"][0] >= 1
                assert set(sizes) <= {"e_step", "softmax_mean", "cg_matvec", "A:max", "A:sum"}
            assert [sorted(i) for i in per_iter[1001][how]] == [sorted(i) for i in per_iter[4003][how]]
    # its rebuild from the top tokens of a large vocabulary: parameter-sized collectives only
    build = results[0]["count"]["build"]
    top = build["curvature_top"]  # gathered top logits, K per token kept on each rank, padded
    assert top[1] // top[0] == world_size * 2048 * K * 8
    assert build["curvature_mean"][1] // build["curvature_mean"][0] == 8 * K * (L + 1)
    assert build["curvature_cov"][1] // build["curvature_cov"][0] == 8 * K * L * L
    # data-parallel sampling: the same total counts however the work is split
    from torch_softmix import hf

    for res in results:
        assert torch.equal(res["sample"]["next"], results[0]["sample"]["next"])
    if world_size == 2:
        single = dw.run_tasks(Comm(), ["sample"], {"out_dir": str(tmp_path / "one"), "model_dir": tiny_model_dir})
        assert torch.equal(single["sample"]["next"], results[0]["sample"]["next"])
        assert torch.equal(single["sample"]["streams"], results[0]["sample"]["streams"])
        folder = results[0]["sample"]["folder"]
        from_disk = hf.counts_from_shards(folder, results[0]["sample"]["next"].numel())
        assert torch.equal(from_disk.dense().long(), results[0]["sample"]["next"].long())


def test_a_killed_rank_is_named_and_the_fit_resumes_on_another_world_size(tmp_path):
    ckpt = tmp_path / "fit.ckpt"
    timeout = 20
    args = {"out_dir": str(tmp_path / "kill"), "checkpoint": str(ckpt), "victim": 1, "kill_at": 9, "timeout": timeout}
    t0 = time.time()
    results = dw.launch(2, ["kill"], args, join_timeout=timeout + 60)
    assert results[1] is None  # the victim died
    err = results[0]["kill"]["error"]
    assert err is not None and re.search(r"rank 1\b", err), err
    died_at = float((tmp_path / "kill" / "died_at").read_text())
    assert results[0]["kill"]["caught_at"] - died_at < timeout + 5
    assert time.time() - t0 < timeout + 60
    assert ckpt.exists()
    straight = dw.run_tasks(Comm(), ["resume"], {"checkpoint": str(tmp_path / "straight.ckpt")})["resume"]
    resumed = dw.launch(3, ["resume"], {"out_dir": str(tmp_path / "resume"), "checkpoint": str(ckpt)})
    for res in resumed:
        got = res["resume"]
        assert abs(got["n_iter"] - straight["n_iter"]) <= 2  # refreshed logits may end it an iteration apart
        torch.testing.assert_close(got["beta"], straight["beta"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got["log_alpha"], straight["log_alpha"], rtol=1e-6, atol=1e-9)


def _design_and_counts(folder, dtype=torch.float64):
    from safetensors.torch import save_file

    from torch_softmix import simulate as sim

    X = sim.gaussian_design(3001, 8, seed=0, dtype=dtype)
    bias = 0.1 * torch.randn(3001, generator=torch.Generator().manual_seed(1), dtype=dtype)
    truth = sim.random_mixture(3, 8, norm=2.5, separation=1.5, seed=2)
    counts = sim.sample_counts(sim.make_head(X, truth, bias), 200_000, seed=3)
    save_file({"weight": X, "bias": bias}, str(folder / "design.safetensors"))
    save_file({"counts": counts}, str(folder / "counts.safetensors"))


def test_torchrun_fit_from_files_matches_one_process(tmp_path):
    """The README's command: torchrun ... -m torch_softmix fit --design ... --counts ... (gloo, 2 processes)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from torch_softmix.cli import main

    _design_and_counts(tmp_path)
    common = ["fit", "--design", str(tmp_path / "design.safetensors"), "--counts", str(tmp_path / "counts.safetensors"),
              "-K", "3", "--init", "mom", "--n-init", "3", "--polish-iter", "10", "--quiet"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "one.safetensors")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "torch_softmix",
           *common, "--out", str(tmp_path / "two.safetensors")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("fitted K=3") == 1 and "on 2 ranks" in run.stdout  # only rank 0 reports
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    torch.testing.assert_close(two["beta"], one["beta"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(two["log_alpha"], one["log_alpha"], rtol=1e-6, atol=1e-9)


def test_fabric_example_fits_as_one_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("lightning")
    example = Path(__file__).resolve().parents[1] / "examples" / "fabric_fit.py"
    cmd = [sys.executable, str(example), "--devices", "2", "--p", "4000", "--L", "8", "--N", "200000",
           "--out", str(tmp_path / "h.safetensors")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    gap = float(re.search(r"single-process beta\| = ([0-9.e+-]+)", run.stdout).group(1))
    assert gap < 1e-6 and (tmp_path / "h.safetensors").is_file()
