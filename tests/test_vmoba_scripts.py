"""scripts/flops.py, scripts/bench_attention.py and the kernel lab (scripts/kernels/): the parts that run
without a GPU."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    """scripts/<name>.py as a module (name may hold a folder: "kernels/bench_keyed_tiles")."""
    spec = importlib.util.spec_from_file_location(Path(name).name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_counts_the_paper_video_and_scales_attention_by_density():
    flops = load("flops")
    args = flops.parse_args(["--density", "0.5", "--granularity", "block", "--block-tokens", "128"])
    grid, L = flops.latent_tokens(args)
    assert grid == (24, 36, 64) and L == 55_296
    full, sparse = flops.block_flops(L, args, None), flops.block_flops(L, args, 0.5)
    assert full["self-attn scores+values"] == 4 * L * L * 1536
    assert sparse["self-attn scores+values"] == full["self-attn scores+values"] / 2
    assert sparse["vmoba gate"] == 2 * 432 * 432 * 1536
    assert {k: v for k, v in sparse.items() if "attn scores" not in k and "gate" not in k} == {
        k: v for k, v in full.items() if "attn scores" not in k
    }


def test_bench_attention_options_parse():
    bench = load("bench_attention")
    args = bench.parse_args(["--grids", "8x16x16", "24x36x64", "--kernel-options", '{"USE_TMA": true}'])
    assert args.grids == ["8x16x16", "24x36x64"] and args.dense == ["cudnn", "flash", "efficient"]
    assert not args.profile and bench.parse_args(["--profile"]).profile
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtype", "int8"])
    token = bench.parse_args(["--token-thresholds", "0.25", "0.5"])
    assert token.token_thresholds == [0.25, 0.5] and bench.parse_args([]).token_thresholds == []


def test_grids_parse_as_three_positive_ints_for_every_benchmark(monkeypatch):
    import argparse

    # Undone after the test, with what the kernel scripts add to sys.path themselves (scripts/, the repo).
    monkeypatch.syspath_prepend(str(ROOT / "scripts" / "kernels"))

    bench = load("bench_attention")
    assert bench.parse_grid("24x36x64") == (24, 36, 64) and bench.parse_grid("21X30X52") == (21, 30, 52)
    for bad in ("24x36", "24x0x64", "axbxc", "24x36x64x2"):
        with pytest.raises(argparse.ArgumentTypeError, match="TxHxW"):
            bench.parse_grid(bad)
    p = argparse.ArgumentParser()
    load("kernels/bench_keyed_tiles").token_arguments(p)
    args = p.parse_args(["--grid", "8x16x16", "--density", "0.125"])
    assert (args.grid, args.density, args.heads) == ((8, 16, 16), 0.125, 12)
    assert p.parse_args([]).grid == (24, 36, 64)
    with pytest.raises(SystemExit):
        p.parse_args(["--grid", "8x16"])


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("kernels/bench_keyed_tiles", ["--tiles", "64,128,4,1"], "needs a CUDA GPU"),
        ("kernels/bench_scatter", ["--density", "0.5"], "needs an sm90+ CUDA GPU"),
        ("kernels/bench_keyed_cuda", ["--grid", "8x16x16"], "needs an sm90 CUDA GPU"),
    ],
)
def test_gpu_benchmarks_say_they_need_a_gpu(script, args, message):
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU message")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and message in run.stderr
