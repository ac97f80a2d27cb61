"""Checkpoint integrity on real checkpoints: written by a tiny CPU training run (one process) and by two gloo
ranks under torchrun, then truncated, corrupted or left incomplete file by file. A bad file fails naming
the file and the checkpoint; resuming from `latest` falls back to the previous kept checkpoint, saying so;
a checkpoint is marked complete only when every rank's files are in it."""

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import ROOT, cache, make_cfg, records  # noqa: F401  (cache: the module's latent cache)

from models.transformer import build_transformer
from training.checkpoint import COMPLETE, Checkpointer, CheckpointError, verify
from training.ema import EMA
from training.engine import build_engine, init_distributed

RUN = ("train.steps=4", "checkpoint.every=2", "checkpoint.keep=3", "eval.every=0", "sample.every=0")
RUN = (*RUN, "ema.enabled=true")
# Every kind of file a resume reads, as written by a real run (one rank).
FILES = {
    "model states": "deepspeed/mp_rank_00_model_states.pt",
    "optimizer states": "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "rng": "rng_rank_000.pt",
    "ema": "ema.pt",
    "trainer state": "trainer_state.json",
    "config": "config.yaml",
    "manifest": "manifest_rank_000.json",
    "complete marker": COMPLETE,
}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt(path: Path) -> None:
    """Overwrite 16 bytes in the middle (the size stays; torch.load reads such a file without complaint)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory) -> Path:  # noqa: F811
    """A 4-step run with EMA: checkpoints step_000002 and step_000004, `latest` -> step_000004."""
    from train import train

    run_dir = tmp_path_factory.mktemp("run")
    train(make_cfg(cache, *RUN), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def engine(cache):  # noqa: F811
    """A DeepSpeed engine + generators + EMA like the run's, to load its checkpoints into."""
    cfg = make_cfg(cache, *RUN)
    _, world_size, _ = init_distributed()
    engine = build_engine(build_transformer(cfg.model.transformer), cfg, world_size)
    return (
        engine,
        {},
        EMA(engine.module, cfg.ema.decay),
    )  # train.py keeps no named generators (training.draws)


def copy_checkpoints(run: Path, tmp_path: Path) -> Path:
    root = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints", root)
    return root


def test_a_checkpoint_lists_every_file_it_needs(run):
    step = run / "checkpoints" / "step_000004"
    assert json.loads((step / COMPLETE).read_text()) == {"step": 4, "world_size": 1}
    files = json.loads((step / "manifest_rank_000.json").read_text())["files"]
    assert {FILES[k] for k in FILES if k not in ("manifest", "complete marker")} <= files.keys()
    assert "transformer/config.json" in files and "transformer_ema/config.json" in files
    assert all(meta["size"] == (step / rel).stat().st_size for rel, meta in files.items())
    assert verify(step) == 1


@pytest.mark.parametrize("damage", [truncate, corrupt])
@pytest.mark.parametrize("kind", FILES)
def test_a_bad_file_is_named_and_resuming_from_latest_falls_back(run, engine, tmp_path, caplog, kind, damage):
    root = copy_checkpoints(run, tmp_path)
    bad = root / "step_000004"
    damage(bad / FILES[kind])
    ckpt = Checkpointer(root)

    # An explicit checkpoint.load: the error names the checkpoint and the file (or what is missing).
    with pytest.raises(CheckpointError) as err:
        ckpt.load(bad, *engine)
    named = FILES[kind] if kind != "complete marker" else COMPLETE
    assert str(bad) in str(err.value) and named in str(err.value), str(err.value)
    assert "checkpoint.load=" in str(err.value)  # what to do

    # From `latest`: step_000004 is skipped with a warning saying why; step_000002 is loaded.
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        path, state = ckpt.resume(None, *engine)
    assert path == root / "step_000002" and state.step == 2 and state.data["batch"] > 0
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and str(bad) in skipped[0] and named in skipped[0]
    assert any("resumed from the older checkpoint" in r.getMessage() for r in caplog.records)


def test_an_unreadable_latest_pointer_falls_back_to_the_newest_checkpoint(run, engine, tmp_path, caplog):
    root = copy_checkpoints(run, tmp_path)
    ckpt = Checkpointer(root)
    for pointer in (b"\xff\xfe\x00garbage", b"step_000009\n", b""):
        (root / "latest").write_bytes(pointer)
        with pytest.raises(CheckpointError, match="latest"):
            ckpt.latest()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
            path, state = ckpt.resume(None, *engine)
        assert path == root / "step_000004" and state.step == 4
        assert any(str(root / "latest") in r.getMessage() for r in caplog.records)


def test_no_loadable_checkpoint_lists_each_and_says_what_to_do(run, engine, tmp_path):
    root = copy_checkpoints(run, tmp_path)
    truncate(root / "step_000004" / FILES["optimizer states"])
    (root / "step_000002" / FILES["rng"]).unlink()
    with pytest.raises(CheckpointError) as err:
        Checkpointer(root).resume(None, *engine)
    message = str(err.value)
    assert "step_000004: " in message and FILES["optimizer states"] in message and "truncated" in message
    assert "step_000002: " in message and "rank 0's rng_rank_000.pt is missing" in message
    assert "new run dir" in message


def test_a_checkpoint_without_manifests_still_names_a_bad_file(run, engine, tmp_path):
    """Checkpoints written before manifests existed load as before; a bad file there is named at read time."""
    root = copy_checkpoints(run, tmp_path)
    step = root / "step_000004"
    for file in [step / COMPLETE, *step.glob("manifest_rank_*.json")]:
        file.unlink()
    assert Checkpointer(root).load(step, *engine).step == 4
    truncate(step / FILES["rng"])
    with pytest.raises(CheckpointError, match=rf"{step}: cannot read rng_rank_000.pt \(\w+Error"):
        Checkpointer(root).load(step, *engine)
    shutil.copy(run / "checkpoints" / "step_000004" / FILES["rng"], step / FILES["rng"])
    truncate(step / FILES["optimizer states"])
    with pytest.raises(CheckpointError, match=rf"{step}: DeepSpeed could not load {step / 'deepspeed'}"):
        Checkpointer(root).load(step, *engine)


def test_training_resumes_from_the_previous_checkpoint_with_the_uninterrupted_losses(cache, run, tmp_path):  # noqa: F811
    """The run resumed over a corrupt newest checkpoint redoes steps 3-4 exactly as the first time."""
    from train import train

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    corrupt(resumed / "checkpoints" / "step_000004" / FILES["optimizer states"])
    train(make_cfg(cache, *RUN), resumed)
    first, again = records(run / "metrics.jsonl"), records(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in again)
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in first] == [r[key] for r in again], key
    assert verify(resumed / "checkpoints" / "step_000004") == 1  # rewritten whole


def test_two_ranks_mark_a_checkpoint_complete_only_with_both_ranks_files(tmp_path, launch_env):
    """Two gloo ranks under torchrun (tests/checkpoint_ranks.py): a checkpoint both save into one dir
    is complete with both ranks' files; when each rank saves into a run dir of its own (what ranks that
    resolve different `hydra.run.dir`s did), both fail naming the missing rank and no `latest` is written.
    A corrupt file of rank 1 makes both ranks fall back to the previous checkpoint together."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**launch_env, "PYTHONPATH": str(ROOT)}

    def launch(mode: str) -> list[dict]:
        done = subprocess.run(
            [*torchrun, "tests/checkpoint_ranks.py", mode, str(tmp_path)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]

    reports = launch("save")
    step = tmp_path / "checkpoints" / "step_000002"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000002\n"
    assert json.loads((step / COMPLETE).read_text())["world_size"] == 2
    rank1 = json.loads((step / "manifest_rank_001.json").read_text())["files"]
    assert sorted(rank1) == ["deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank_001.pt"]
    for report in reports:  # the split save: both ranks raise rank 0's verdict
        assert "rank 1 wrote no manifest_rank_001.json" in report["split_error"]
        assert str(tmp_path / "run_0" / "checkpoints") in report["split_error"]
    assert not list(tmp_path.glob("run_*/checkpoints/latest"))
    assert not list(tmp_path.glob("run_*/checkpoints/step_*"))

    # Loading validates the same: a dir missing one rank's file names it.
    shard = step / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    saved = shard.read_bytes()
    shard.unlink()
    with pytest.raises(
        CheckpointError, match=r"rank 1's deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt is"
    ):
        verify(step, rank=0, world_size=2)
    # Only rank 1's shard is bad (rank 1 checks its own CRC-32s): both ranks still skip step 2 together.
    shard.write_bytes(saved)
    corrupt(shard)
    assert launch("resume") == [{"loaded": "step_000001", "step": 1}] * 2
