"""Several processes on CPU (gloo), through the launchers users type: data parallel and Ulysses sequence
parallel give the run one process gives with the same global batch.

Bound: fp32 on CPU, the runs differ only in the order of floating-point sums (the gradient all-reduce,
the loss mean over ranks, and sequence parallelism's per-shard partial gradients). Losses agree to a
relative 1e-5. Weights are compared by what training changed: the difference of the two runs' weights is
at most 1e-4 of the update (final - initial weights) as one vector. Not per element: Adam divides each
gradient by its running RMS, so a parameter whose gradient is near zero turns a rounding difference into
a visible fraction of its (tiny) update.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fresh_env
from safetensors.torch import load_file

from data.cache import cache_dataset
from data.loader import BucketBatchSampler
from data.video_io import write_video

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("n", [1, 4, 5, 7])
def test_sampler_shards_every_clip_evenly_and_matches_one_rank_with_the_global_batch(world, batch, n):
    """Every rank gets the same number of full batches, every clip appears in every epoch (none dropped
    however n divides), and where no batch is filled up the ranks' shares of a step are exactly what one
    rank of batch `batch * world` gets."""
    shapes = [(4, 1, 2, 2)] * n + [(4, 2, 2, 2)] * (n // 2)  # two buckets
    ranks = [
        BucketBatchSampler(shapes, batch, shuffle=True, seed=3, rank=r, world_size=world)
        for r in range(world)
    ]
    one = BucketBatchSampler(shapes, batch * world, shuffle=True, seed=3)
    for epoch in range(2):
        shares = [list(s) for s in ranks]  # each pass is one epoch
        assert len({len(s) for s in shares}) == 1
        assert {i for s in shares for b in s for i in b} == set(range(len(shapes)))
        if world > 1:
            assert all(len(b) == batch for s in shares for b in s)
        steps = [sum((s[k] for s in shares), []) for k in range(len(shares[0]))]
        global_batches = list(one)
        full = [k for k, b in enumerate(global_batches) if len(b) == batch * world]
        assert [steps[k] for k in full] == [global_batches[k] for k in full], epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def four_clips(tmp_path_factory) -> list[str]:
    """Overrides pointing `data` at a cache of 4 train clips (a global batch of 2 divides it) + 1 val."""
    from hydra import compose, initialize_config_dir

    from training.config import load_config

    root = tmp_path_factory.mktemp("clips4")
    g = torch.Generator().manual_seed(1)
    t = torch.arange(9).view(1, 9, 1, 1)
    y, x = torch.meshgrid(torch.linspace(0, 3, 32), torch.linspace(0, 3, 32), indexing="ij")
    for i in range(5):
        phase = torch.rand(3, 1, 1, 1, generator=g) * 6
        video = torch.sin(x + 0.3 * (i + 1) * t + phase) * torch.cos(y - 0.2 * t + i)
        write_video(root / "clips" / f"clip{i}.mp4", video.clamp(-1, 1), fps=8)
        (root / "clips" / f"clip{i}.txt").write_text(f"clip number {i}")
    data = dict(
        source=root / "clips", cache_dir=root / "cache", frames=9, height=32, width=32, num_workers=0,
        shard_size=1,  # a shard per clip: one can be corrupted under one rank only
    )  # fmt: skip
    overrides = [f"++data.{k}={v}" for k, v in data.items()] + ["++data.val_keys=[clip4]"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = load_config(compose(config_name="train", overrides=overrides))
    cache_dataset(cfg.model.vae, cfg.model.text_encoder, cfg.data, progress=False)
    return [
        *overrides,  # data.cache_dir first: a test may point it at a copy
        "++attention.block_2d=[1,2]",
        "++attention.block_3d=[2,1,2]",
        "wandb.mode=disabled",
        "eval.every=0",
        "eval.num_batches=1",
        "sample.every=0",
        "sample.steps=1",
        "sample.prompts=[a ball]",
        "train.warmup_steps=0",
        "train.steps=3",
        "checkpoint.every=2",
    ]


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-4000:])
    return done


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    (path,) = (latest / "transformer").glob("*.safetensors")
    return load_file(path)


def _initial_weights() -> dict[str, torch.Tensor]:
    from models.config import TransformerConfig
    from models.transformer import build_transformer

    return build_transformer(TransformerConfig()).state_dict()  # the configs' default: tiny, seed 0


def _assert_close(run: Path, reference: Path) -> None:
    got, want = _losses(run), _losses(reference)
    assert len(got) == len(want) == 3
    assert all(abs(a - b) <= TOL * abs(b) for a, b in zip(got, want, strict=True)), (got, want)
    a, b, init = _weights(run), _weights(reference), _initial_weights()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in b]).norm()
    update = torch.cat([(b[k] - init[k]).flatten() for k in b]).norm()
    print(f"weights: |run - reference| / |update| = {diff / update:.2e}")
    assert diff <= 1e-4 * update


DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]


def _deepspeed(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 train.py <args>` exactly as documented, from `cwd`, on a free port."""
    return _run([*DEEPSPEED, "--master_port", str(_free_port()), str(ROOT / "train.py"), *args], cwd, env)


@pytest.fixture(scope="module")
def runs(four_clips, tmp_path_factory) -> dict:
    """One process of batch 2; `deepspeed --num_gpus 2` with 2 data-parallel ranks of batch 1 and with
    train.sequence_parallel=2 (one clip of batch 2 split over both ranks). The launched runs use the
    default timestamped run dir, which must be one directory for both ranks."""
    env = fresh_env()
    root = tmp_path_factory.mktemp("runs")
    out = {"single": root / "single", "four_clips": four_clips}
    _run(
        [sys.executable, "train.py", "train.batch_size=2", *four_clips, f"hydra.run.dir={out['single']}"],
        ROOT,
        env,
    )
    for name, overrides in {
        "dp": ["train.batch_size=1"],
        "sp": ["train.batch_size=2", "train.sequence_parallel=2"],
    }.items():
        cwd = root / name
        cwd.mkdir()
        _deepspeed([*overrides, *four_clips], cwd, env)
        (out[name],) = (cwd / "outputs" / "runs").iterdir()  # both ranks agreed on one stamped dir
    return out


@pytest.mark.parametrize("name", ["dp", "sp"])
def test_deepspeed_launcher_data_and_sequence_parallel_match_one_process(runs, name):
    run = runs[name]
    # Throughput counts every data-parallel group's real tokens once: 2 clips of 3x2x2 tokens per step
    # (two ranks of one clip, or one clip pair split over two SP ranks), shared by the 2 GPUs.
    for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        assert record["tokens_per_s"] * record["step_time"] == pytest.approx(2 * 12)
        assert record["tokens_per_s_per_gpu"] == pytest.approx(record["tokens_per_s"] / 2)
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert json.loads((latest / "complete.json").read_text())["world_size"] == 2
    _assert_close(run, runs["single"])


@pytest.mark.parametrize("saved, resumed", [("dp", "single"), ("single", "dp")])
def test_a_checkpoint_of_two_ranks_resumes_on_one_and_back(runs, saved, resumed, tmp_path):
    """Step 2's checkpoint of one layout resumes on the other with the same global batch (the changed keys
    allowed): step 3's loss, computed from the restored weights on the next epoch's clips with the same
    draws, equals the uninterrupted run's; the optimizer moments restart (said in the log)."""
    env = fresh_env()
    checkpoint = runs[saved] / "checkpoints" / "step_000002"
    layout = {"single": ["train.batch_size=2"], "dp": ["train.batch_size=1"]}[resumed]
    args = [
        *layout, *runs["four_clips"], f"checkpoint.load={checkpoint}", f"hydra.run.dir={tmp_path}",
        "checkpoint.allow_changes=[world_size,train.batch_size]",
    ]  # fmt: skip
    if resumed == "single":
        done = _run([sys.executable, "train.py", *args], ROOT, env)
    else:
        done = _deepspeed(args, tmp_path, env)
    assert "the optimizer's moments restart from zero" in done.stdout + done.stderr
    ((step, loss),) = [
        (r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    ]
    assert step == 3 and abs(loss - _losses(runs["single"])[2]) <= TOL * abs(loss)


def test_a_corrupt_cache_entry_met_by_one_rank_stops_both_naming_it(four_clips, tmp_path):
    """Two ranks under torchrun; the shard of the first clip rank 1 reads has a broken header of the same
    size (so the cache still validates): rank 1 fails naming the file and the sample, and rank 0 stops
    saying which rank failed, instead of waiting for it in the next collective."""
    import shutil

    from hydra import compose, initialize_config_dir

    from data.loader import CachedLatentDataset
    from training.config import load_config

    cache = tmp_path / "cache"
    source = next(o for o in four_clips if o.startswith("++data.cache_dir=")).split("=", 1)[1]
    shutil.copytree(source, cache)
    overrides = [o for o in four_clips if not o.startswith("++data.cache_dir=")] + [
        f"++data.cache_dir={cache}"
    ]

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = load_config(compose(config_name="train", overrides=overrides))
    dataset = CachedLatentDataset(cfg.data, "train")
    sampler = BucketBatchSampler(dataset.shapes(), 1, shuffle=True, seed=cfg.seed, rank=1, world_size=2)
    item = dataset.items[next(iter(sampler))[0]]
    shard = cache / item["file"]
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 : 8 + header] = b"}" * header  # same size: not JSON any more
    shard.write_bytes(bytes(data))

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*torchrun, "train.py", "train.batch_size=1", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=ROOT, env=fresh_env(), capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"sample {item['key']!r} of {shard} cannot be read" in out, out[-3000:]
    assert "rank(s) [1] could not load their batch" in out, out[-3000:]
