"""Resuming with a changed config (training.resume): refused changes name each key as old -> new and how to
allow it; allowed and harmless ones pass and are logged; an allowed `train.lr` takes effect; each resumed
segment's config is kept. Key comparison on composed configs, then real resumed CPU runs of train.py."""

import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from test_train import cache, make_cfg, records  # noqa: F401  (cache: the module's latent cache)

from training.engine import lr_lambda
from training.resume import ResumeError, compare, config_values


def values(*overrides: str, world_size: int = 1) -> dict:
    """The flat values `ResumePlan` compares, for the train config composed with `overrides`."""
    return config_values(OmegaConf.to_yaml(OmegaConf.structured(make_cfg([], *overrides))), world_size)


def test_refused_changes_name_each_key_old_and_new_value_and_how_to_allow_them():
    old = values()
    new = values("train.lr=0.0123", "train.batch_size=3", "attention=full", "train.steps=7")
    with pytest.raises(ResumeError) as err:
        compare(old, new, [])
    message = str(err.value)
    assert f"train.lr: {old['train.lr']!r} -> 0.0123" in message
    assert f"train.batch_size: {old['train.batch_size']} -> 3" in message
    assert "attention.type: 'vmoba' -> 'full'" in message
    allow = message.split("checkpoint.allow_changes=[")[1].split("]")[0].split(",")
    assert allow == ["attention", "train.batch_size", "train.lr"]  # a node for 3 or more of its keys
    assert "train.steps" not in message  # harmless: not refused


def test_a_new_world_size_is_refused_like_a_batch_size():
    with pytest.raises(ResumeError, match=r"world_size: 1 -> 2"):
        compare(values(), values(world_size=2), [])
    assert compare(values(), values(world_size=2), ["world_size"])["allowed"] == {"world_size": (1, 2)}


def test_allowed_changes_pass_by_key_or_node_and_are_reported():
    old, new = values(), values("train.lr=0.0123", "attention=full")
    changes = compare(old, new, ["train.lr", "attention"])
    assert changes["allowed"]["train.lr"] == (old["train.lr"], 0.0123)
    assert changes["allowed"]["attention.type"] == ("vmoba", "full")
    # Between two full-attention configs VMoBA's settings are unused: they pass.
    full = values("attention=full")
    assert compare(full, {**full, "attention.threshold": 0.5}, [])["harmless"] == {
        "attention.threshold": (full["attention.threshold"], 0.5)
    }
    with pytest.raises(ResumeError, match=r"names no config key: \['train.lrr'\]"):
        compare(old, new, ["train.lrr"])


def test_changes_that_never_matter_pass_without_being_allowed():
    harmless = [
        "train.steps=999", "train.log_every=5", "wandb.project=other", "sample.every=3", "eval.every=7",
        "checkpoint.every=9", "checkpoint.keep=5", "data.num_workers=2", "ema.enabled=true",
    ]  # fmt: skip
    changes = compare(values(), values(*harmless), [])
    assert {"train.steps", "wandb.project", "sample.every", "checkpoint.keep", "ema.enabled"} <= changes[
        "harmless"
    ].keys()
    assert len(changes["harmless"]) == len(harmless) and not changes["allowed"]
    # A setting added since the checkpoint was written (absent from its config) passes too.
    old = {k: v for k, v in values().items() if k != "checkpoint.allow_changes"}
    assert compare(old, values(), [])["unmatched"] == {"checkpoint.allow_changes": ("<absent>", [])}


BASE = ("checkpoint.every=2", "eval.every=0", "sample.every=0", "train.lr_schedule=linear")


@pytest.fixture(scope="module")
def first(cache, tmp_path_factory) -> Path:  # noqa: F811
    """A 2-step run (checkpoint at step 2) to resume for 2 more steps with a changed config."""
    from train import train

    run_dir = tmp_path_factory.mktemp("first")
    train(make_cfg(cache, *BASE, "train.steps=2"), run_dir)
    return run_dir


def resume(cache, first: Path, tmp_path: Path, *changes: str) -> Path:  # noqa: F811
    from train import train

    run_dir = tmp_path / "run"
    shutil.copytree(first, run_dir)
    train(make_cfg(cache, *BASE, "train.steps=4", *changes), run_dir)
    return run_dir


@pytest.mark.parametrize(
    "change, key",
    [
        ("train.lr=0.0005", "train.lr"),
        ("train.batch_size=2", "train.batch_size"),
        ("attention=full", "attention.type"),
    ],
)
def test_resuming_with_a_refused_change_fails_before_training(cache, first, tmp_path, change, key):  # noqa: F811
    with pytest.raises(ResumeError, match=rf"{key}: .* -> ") as err:
        resume(cache, first, tmp_path, change)
    allow = str(err.value).split("checkpoint.allow_changes=[")[1].split("]")[0].split(",")
    assert allow == [key.split(".")[0] if key.startswith("attention") else key]  # several attention keys
    assert [r["step"] for r in records(tmp_path / "run" / "metrics.jsonl")] == [1, 2]  # nothing trained
    assert not list((tmp_path / "run").glob("config.resume-*.yaml"))


def test_an_allowed_lr_takes_effect_and_each_segment_keeps_its_config(cache, first, tmp_path):  # noqa: F811
    new_lr = 0.0005
    run_dir = resume(cache, first, tmp_path, f"train.lr={new_lr}", "checkpoint.allow_changes=[train.lr]")
    logged = records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    # The logged lr (the next step's) follows the new base LR on the schedule stretched to 4 steps.
    factor = lr_lambda(make_cfg([], *BASE, "train.steps=4"))
    assert [r["lr"] for r in logged[2:]] == [new_lr * factor(3), new_lr * factor(4)]
    assert logged[2]["lr"] > 0
    old_lr = yaml.safe_load((first / "config.yaml").read_text())["train"]["lr"]
    assert old_lr != new_lr and logged[0]["lr"] == old_lr * lr_lambda(make_cfg([], *BASE, "train.steps=2"))(1)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == old_lr  # the first's
    segment = yaml.safe_load((run_dir / "config.resume-000002.yaml").read_text())
    assert segment["train"]["lr"] == new_lr and segment["checkpoint"]["allow_changes"] == ["train.lr"]


def test_an_allowed_batch_size_continues_at_the_next_epoch(cache, first, tmp_path):  # noqa: F811
    """The data position counts batches of the old size: an allowed new size starts the next epoch
    instead of skipping past the end of this one (the bare StopIteration resumes used to die with)."""
    run_dir = resume(
        cache, first, tmp_path, "train.batch_size=3", "checkpoint.allow_changes=[train.batch_size]"
    )
    assert [r["step"] for r in records(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    state = yaml.safe_load((run_dir / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    first_state = yaml.safe_load((first / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    # 3 training clips: one batch of 3 per epoch, from the epoch after the checkpoint's.
    assert state["data"] == {"epoch": first_state["data"]["epoch"] + 2, "batch": 1}
