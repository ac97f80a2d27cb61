"""Hydra composition of configs/train.yaml and configs/sample.yaml, validation errors, DeepSpeed config."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import schema
from training.config import ConfigError, SampleAppConfig, TrainConfig, load_config, validate
from training.engine import deepspeed_config, lr_lambda

REPO = Path(__file__).resolve().parents[1]
CONFIGS = str(REPO / "configs")


def compose_train(*overrides: str):
    """configs/train.yaml as a run composes it; a bad override raises ConfigError naming its key."""
    return schema.compose("train", overrides)


def test_default_train_config_composes_and_validates():
    cfg = load_config(compose_train())
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.family == "wan" and cfg.attention.type == "vmoba" and cfg.deepspeed.stage == 2
    assert cfg.optimizer.name == "adamw" and cfg.wandb.mode == "offline"
    # The sampled size follows the data node unless overridden.
    assert (cfg.sample.frames, cfg.sample.height, cfg.sample.width) == (
        cfg.data.frames,
        cfg.data.height,
        cfg.data.width,
    )


@pytest.mark.parametrize(
    "group", ["attention=full", "deepspeed=zero3", "deepspeed=zero3_offload", "optimizer=deepspeed_adam"]
)
def test_every_group_option_validates(group):
    cfg = load_config(compose_train(group))
    key, value = group.split("=")
    if key == "deepspeed":
        assert cfg.deepspeed.stage == 3 and (cfg.deepspeed.offload_param == "cpu") == value.endswith(
            "offload"
        )
    elif key == "optimizer":
        assert cfg.optimizer.name == value
    else:
        assert cfg.attention.type == value


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=-1", "train.lr: must be > 0, got -1.0"),
        (
            "train.lr_schedule=step",
            "train.lr_schedule: must be one of ['constant', 'linear', 'cosine'], got 'step'",
        ),
        ("objective.timestep_sampling=beta", "objective.timestep_sampling: must be one of"),
        ("deepspeed.stage=4", "deepspeed.stage: must be one of [0, 1, 2, 3], got 4"),
        ("deepspeed.offload_param=cpu", "deepspeed.offload_param: needs stage=3"),
        ("sample.guidance=0.5", "sample.guidance: must be >= 1"),
        ("eval.timesteps=[0.5,1.5]", "eval.timesteps: must be values in (0, 1]"),
        ("train.steps=abc", "train.steps: Value 'abc' of type 'str' could not be converted to Integer"),
        ("+train.lrr=1", "train.lrr: Key 'lrr' not in 'TrainLoopConfig'"),
        ("+bogus=1", "bogus: Key 'bogus' not in 'TrainConfig'"),
        ("attention.threshold=2", "attention.threshold must be in (0, 1]"),
        ("model.vae.dtype=int8", "model.vae.dtype must be one of"),
        ("data.frames=10", "data.frames=10: must be 4k + 1 (VAE 4 x patch 1); use 9 or 13"),
        ("train.keep_attention=true", "train.keep_attention: needs train.activation_checkpointing=true"),
        ("train.keep_attention_blocks=4", "train.keep_attention_blocks: needs train.keep_attention=true"),
        (
            "train.activation_checkpointing=true train.keep_attention=true train.keep_attention_blocks=-1",
            "train.keep_attention_blocks: must be >= 0 (null: every block), got -1",
        ),
    ],
)
def test_bad_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(compose_train(*override.split()))
    assert str(err.value).startswith(message), str(err.value)


def test_sample_config_composes_and_rejects_bad_values():
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = validate(
            SampleAppConfig, compose(config_name="sample", overrides=["attention=full", "steps=3"])
        )
        assert cfg.attention.type == "full" and cfg.steps == 3 and cfg.checkpoint is None
        with pytest.raises(ConfigError, match=r"^steps: must be >= 1, got 0"):
            validate(SampleAppConfig, compose(config_name="sample", overrides=["steps=0"]))
        with pytest.raises(ConfigError, match=r"^precision: must be one of"):
            validate(SampleAppConfig, compose(config_name="sample", overrides=["precision=fp8"]))


def test_deepspeed_config_is_generated_from_values():
    cfg = load_config(
        compose_train(
            "deepspeed=zero3_offload", "train.batch_size=2", "train.grad_accum=3", "train.grad_clip=0.5"
        )
    )
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    zero = ds["zero_optimization"]
    assert (
        zero["stage"] == 3
        and zero["offload_param"]["device"] == "cpu"
        and zero["offload_optimizer"]["device"] == "cpu"
    )
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch AdamW with offloaded states
    assert ds["bf16"]["enabled"] is False  # precision auto on a CPU machine (no CUDA in the test env)
    assert "offload_param" not in deepspeed_config(load_config(compose_train()), 1)["zero_optimization"]


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = load_config(
        compose_train(
            "train.steps=110", "train.warmup_steps=10", "train.lr_schedule=cosine", "train.min_lr_ratio=0.1"
        )
    )
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(110) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.lr=-1"], "config error: train.lr: must be > 0, got -1.0"),
        (
            ["--cfg", "job", "train.lr=-1"],
            "config error: train.lr: must be > 0, got -1.0",
        ),  # --cfg skips the task
        (["train.steps=abc"], "config error: train.steps: Value 'abc' of type 'str' could not be converted"),
        (["+train.lrr=1"], "config error: train.lrr: Key 'lrr' not in 'TrainLoopConfig'"),
    ],
)
def test_train_py_prints_one_line_for_a_config_error(args, message, launch_env):
    run = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=launch_env,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and run.stderr.startswith(message), (
        run.stderr
    )
    assert "Traceback" not in run.stderr and run.stdout == ""


def test_train_py_cfg_job_shows_every_default():
    """The schema is the config's base: `--cfg job` lists keys no YAML sets, with the dataclass defaults."""
    run = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--cfg", "job", "train.lr=0.5"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    shown = OmegaConf.create(run.stdout)
    assert shown.train.lr == 0.5 and shown.train.warmup_steps == 20 and shown.sample.every == 150
    assert shown.attention.block_1d == 1 and shown.checkpoint.keep == 2
