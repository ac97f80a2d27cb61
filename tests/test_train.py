"""train.py end to end on CPU: real DeepSpeed (gloo), real Hydra composition, a real latent cache built
from mp4s the test writes; wandb offline in the first test, disabled in the others (its service process
costs seconds). Tiny: 4 clips of 9 frames at 32x32 (latents 4x3x4x4)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import decord
import pytest
import torch
from hydra import compose, initialize_config_dir

from data import build_dataloader
from data.cache import cache_dataset
from data.video_io import write_video
from models.attention import VMoBAAttention, install_attention
from models.config import TransformerConfig
from models.transformer import build_transformer
from training.config import load_config
from training.metrics import validation_loss
from training.model_fn import make_model_fn
from training.objective import FlowMatching

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a red ball rolls over green grass",
    "a camera pans over a city street",
    "a cat sleeping on a table",
    "the moon surface",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> list[str]:
    """Hydra overrides pointing `data` at a freshly built latent cache (3 train clips, 1 validation clip)."""
    root = tmp_path_factory.mktemp("clips")
    g = torch.Generator().manual_seed(0)
    frames = torch.arange(9).view(1, 9, 1, 1)
    for i, caption in enumerate(CAPTIONS):
        # A smooth pattern drifting over time, different per clip (memorisable, not constant).
        y, x = torch.meshgrid(torch.linspace(0, 3, 32), torch.linspace(0, 3, 32), indexing="ij")
        phase = torch.rand(3, 1, 1, 1, generator=g) * 6
        video = torch.sin(x + 0.3 * (i + 1) * frames + phase) * torch.cos(y - 0.2 * frames + i)
        write_video(root / "clips" / f"clip{i}.mp4", video.clamp(-1, 1), fps=8)
        (root / "clips" / f"clip{i}.txt").write_text(caption)
    data = dict(source=root / "clips", cache_dir=root / "cache", frames=9, height=32, width=32, num_workers=0)
    overrides = [f"++data.{k}={v}" for k, v in data.items()] + ["++data.val_keys=[clip3]"]
    cfg = make_cfg(overrides)  # the same composed config train.py gets, as scripts/cache_latents.py does
    cache_dataset(cfg.model.vae, cfg.model.text_encoder, cfg.data, progress=False)
    return overrides


# VMoBA blocks that fit the 3x2x2 token grid (the demo config's blocks are sized for 5x8x8).
SMALL_BLOCKS = ["++attention.block_2d=[1,2]", "++attention.block_3d=[2,1,2]"]
FAST = [
    *SMALL_BLOCKS, "sample.steps=2", "sample.prompts=[a red ball rolls over green grass]",
    "eval.num_batches=1", "wandb.mode=disabled",
    "eval.timesteps=[0.5]", "train.warmup_steps=0", "train.lr_schedule=constant",
]  # fmt: skip


def make_cfg(cache, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return load_config(compose(config_name="train", overrides=[*cache, *FAST, *overrides]))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def interrupted_copy(full: Path, resumed: Path) -> None:
    """`resumed` = the 4-step run `full` as it was after its step-2 checkpoint (later records are rewound)."""
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    (resumed / "checkpoints" / "latest").write_text("step_000002\n")


def assert_same_steps(a: list[dict], b: list[dict]) -> None:
    """Two runs' metrics.jsonl records: steps 1-4, the same loss, grad norm and LR at each."""
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_one_step_changes_weights_and_writes_the_run_dir(cache, tmp_path):
    from train import train

    cfg = make_cfg(cache, "train.steps=1", "wandb.mode=offline")
    before = {k: v.clone() for k, v in build_transformer(cfg.model.transformer).state_dict().items()}
    summary = train(cfg, tmp_path, name="one-step")

    (metrics,) = records(tmp_path / "metrics.jsonl")
    assert metrics["step"] == 1 and math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert metrics["tokens_per_s"] > 0 and any(k.startswith("density/layer_") for k in metrics)
    (evaluation,) = records(tmp_path / "eval.jsonl")
    assert math.isfinite(evaluation["val_loss"]) and 0 < evaluation["recall/mean"] <= 1
    latest = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert (
        latest.name == "step_000001" and json.loads((latest / "trainer_state.json").read_text())["step"] == 1
    )
    assert (latest / "deepspeed").is_dir() and (latest / "config.yaml").exists()
    after = build_transformer(
        TransformerConfig(arch=None, pretrained=str(latest / "transformer"))
    ).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2 and all(torch.isfinite(v).all() for v in after.values())
    assert (tmp_path / "samples" / "step_000001" / "prompt_00.mp4").stat().st_size > 0
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert summary["steps"] == 1 and json.loads((tmp_path / "summary.json").read_text()) == summary


def test_zero3_and_checkpointing_train_and_export_the_same_weights_as_zero2(cache, tmp_path, attend_calls):
    """ZeRO-3 partitions the parameters; its diffusers export must gather them: two steps under ZeRO-3
    and under ZeRO-2 (same seeds, fp32) export the same weights; so do two under ZeRO-2 with activation
    checkpointing that keeps the attention outputs of the first two blocks (`train.keep_attention`,
    `train.keep_attention_blocks=2`), whose recomputes run no attention: per step one kernel call per
    layer, and one more for the third layer's recompute."""
    from train import train

    calls = attend_calls(VMoBAAttention)
    model = build_transformer(make_cfg(cache).model.transformer)
    initial, layers = model.state_dict(), len(model.blocks)
    assert layers > 2  # so that keeping two blocks differs from keeping every block

    runs = {
        "zero2": ["deepspeed=zero2"],
        "zero3": ["deepspeed=zero3"],
        "keep": [
            "deepspeed=zero2",
            "train.activation_checkpointing=true",
            "train.keep_attention=true",
            "train.keep_attention_blocks=2",
        ],
    }
    # Grad-enabled attention calls in two steps: one per layer and step, plus the third layer's recomputes.
    expected_calls = {"zero2": 2 * layers, "zero3": 2 * layers, "keep": 2 * (layers + layers - 2)}
    exported = {}
    for name, overrides in runs.items():
        cfg = make_cfg(cache, *overrides, "train.steps=2", "eval.every=0", "sample.every=0")
        calls.clear()
        train(cfg, tmp_path / name, name=name)
        assert len(calls) == expected_calls[name], (name, calls)
        latest = (tmp_path / name / "checkpoints" / "latest").read_text().strip()
        path = tmp_path / name / "checkpoints" / latest / "transformer"
        exported[name] = build_transformer(TransformerConfig(arch=None, pretrained=str(path))).state_dict()
    assert any(not torch.equal(initial[k], exported["zero3"][k]) for k in initial)
    for k, v in exported["zero2"].items():
        torch.testing.assert_close(exported["zero3"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(exported["keep"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_loss_falls_on_memorisable_data(cache, tmp_path):
    from train import train

    cfg = make_cfg(
        cache, "train.steps=40", "train.lr=3e-3", "eval.every=0", "sample.every=0", "checkpoint.every=40"
    )
    batches = list(build_dataloader(cfg.data, "train", batch_size=3))
    objective = FlowMatching(cfg.objective)

    def fixed_loss(model) -> float:  # the training clips at fixed timesteps and noise
        install_attention(model, cfg.attention)
        model_fn = make_model_fn(model, "wan", cfg.objective.num_train_timesteps, torch.float32)
        return validation_loss(model_fn, objective, batches, [0.2, 0.5, 0.8], seed=0)

    initial = fixed_loss(build_transformer(cfg.model.transformer))
    train(cfg, tmp_path, name="memorise")
    final = fixed_loss(
        build_transformer(
            TransformerConfig(arch=None, pretrained=str(tmp_path / "checkpoints/step_000040/transformer"))
        )
    )
    assert final < 0.6 * initial, (initial, final)


def test_resume_from_latest_gives_the_uninterrupted_losses(cache, tmp_path):
    from train import train

    overrides = (
        "train.steps=4",
        "checkpoint.every=2",
        "checkpoint.keep=3",
        "eval.every=2",
        "sample.every=0",
        "ema.enabled=true",
    )
    full = tmp_path / "full"
    train(make_cfg(cache, *overrides), full)
    resumed = tmp_path / "resumed"
    interrupted_copy(full, resumed)
    train(make_cfg(cache, *overrides), resumed)

    assert_same_steps(records(full / "metrics.jsonl"), records(resumed / "metrics.jsonl"))
    assert [r["val_loss"] for r in records(full / "eval.jsonl")] == [
        r["val_loss"] for r in records(resumed / "eval.jsonl")
    ]
    ema_a = torch.load(full / "checkpoints/step_000004/ema.pt")
    ema_b = torch.load(resumed / "checkpoints/step_000004/ema.pt")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_train_cli_multirun_writes_runs_and_summary_table(cache, tmp_path, launch_env):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "train.py", "-m", "attention=vmoba,full", "train.steps=2", "sample.every=0",
        *cache, *FAST, f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=launch_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert (
        len(runs) == 2 and runs[0].startswith("00_++attention.block_2d=[1,2]") and runs[1].startswith("01_")
    )
    table = (sweep / "summary.md").read_text().splitlines()
    # The swept parameter has its own column, the rows its values.
    assert table[0].startswith("| run | attention | final_loss | val_loss") and len(table) == 4
    assert [row.split(" | ")[1] for row in table[2:]] == ["vmoba", "full"]
    assert len((sweep / "summary.csv").read_text().splitlines()) == 3
    names = {json.loads((sweep / r / "summary.json").read_text())["name"] for r in runs}
    assert sorted(n.split(",")[0] for n in names) == [
        "attention=full",
        "attention=vmoba",
    ]  # named by overrides


def test_two_ranks_under_torchrun_train_checkpoint_and_resume(cache, tmp_path, launch_env):
    """Data parallel on CPU: `torchrun --nproc-per-node 2 train.py` (gloo), then the same command with more
    steps resumes both ranks from `latest` and continues the step count and the metrics log."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [
        *cache,
        *FAST,
        "eval.every=0",
        "sample.every=0",
        "checkpoint.every=2",
        f"hydra.run.dir={tmp_path}",
    ]
    for steps in (2, 4):
        done = subprocess.run(
            [*torchrun, "train.py", f"train.steps={steps}", *args],
            cwd=ROOT, env=launch_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    logged = records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in logged)
    latest = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step_000004"
    assert sorted(p.name for p in latest.glob("rng_rank_*.pt")) == ["rng_rank_000.pt", "rng_rank_001.pt"]
    assert "resumed from" in done.stdout + done.stderr and "at step 2" in done.stdout + done.stderr
    assert "at step 2" in (tmp_path / "train.log").read_text()  # console lines are kept in the run dir


def test_sample_from_a_run_dir_writes_the_requested_video(cache, tmp_path):
    from sample import generate
    from train import train
    from training.config import SampleAppConfig, validate

    train(make_cfg(cache, "train.steps=1", "sample.every=0", "eval.every=0"), tmp_path / "run")
    overrides = [
        f"checkpoint={tmp_path / 'run'}",
        "steps=2",
        "frames=5",
        "height=32",
        "width=64",
        "prompts=[a cat,a dog]",
    ]
    overrides += SMALL_BLOCKS
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = validate(
            SampleAppConfig,
            compose(config_name="sample", overrides=[*overrides, f"output_dir={tmp_path / 'out'}"]),
        )
    paths = generate(cfg)
    assert sorted(paths) == ["prompt_00", "prompt_01"]
    reader = decord.VideoReader(str(paths["prompt_01"]))
    assert len(reader) == 5 and reader[0].shape == (32, 64, 3)
