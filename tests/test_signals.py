"""Preemption and Ctrl-C: a real signal to a real `python train.py` (and to one rank of a torchrun job)
finishes the step, saves a checkpoint, exits 0 (SIGTERM) or 130 (SIGINT) on every rank; resuming gives
the uninterrupted run's losses. `train.log` holds the run's own lines."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_train import FAST, ROOT, cache, records  # noqa: F401  (cache: the module's latent cache)

# A signalled run is given far more steps than it can reach before the signal lands (a step of the tiny
# model takes tens of milliseconds on 2 cores): the signal, not the end of training, must stop it.
# FAST's constant LR makes `train.steps` change nothing else, so a run resumed with fewer steps follows
# the uninterrupted one (`train.steps` is a change resuming allows).
LONG = 500
ARGS = [*FAST, "eval.every=0", "sample.every=0", "checkpoint.every=1000"]


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and any(r["step"] >= step for r in records(metrics)):
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not logged")


def latest_step(run: Path) -> int:
    name = (run / "checkpoints" / "latest").read_text().strip()
    return json.loads((run / "checkpoints" / name / "trainer_state.json").read_text())["step"]


def test_sigterm_saves_exits_0_and_resuming_gives_the_uninterrupted_losses(cache, tmp_path, launch_env):  # noqa: F811
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = start(
        [sys.executable, "train.py", *cache, *ARGS, f"train.steps={LONG}", f"hydra.run.dir={cut}"], launch_env
    )
    wait_for_step(cut, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = max(r["step"] for r in records(cut / "metrics.jsonl"))
    assert 2 <= stopped < LONG and latest_step(cut) == stopped
    log = (cut / "train.log").read_text()
    assert f"SIGTERM: stopped at step {stopped} with a checkpoint" in log
    assert f"step {stopped}: saving a checkpoint took" in log  # the run's own lines, not only DeepSpeed's

    steps = stopped + 2
    for run in (cut, full):  # resume the cut run; run the same steps uninterrupted
        done = subprocess.run(
            [sys.executable, "train.py", *cache, *ARGS, f"train.steps={steps}", f"hydra.run.dir={run}"],
            cwd=ROOT, env=launch_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = records(full / "metrics.jsonl"), records(cut / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert f"resumed from {cut / 'checkpoints'}" in (cut / "train.log").read_text()


def test_sigint_saves_and_exits_130(cache, tmp_path, launch_env):  # noqa: F811
    proc = start(
        [sys.executable, "train.py", *cache, *ARGS, f"train.steps={LONG}", f"hydra.run.dir={tmp_path}"],
        launch_env,
    )
    wait_for_step(tmp_path, 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # a second Ctrl-C, e.g. during the save, is only reported
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out[-3000:]
    stopped = max(r["step"] for r in records(tmp_path / "metrics.jsonl"))
    assert stopped < LONG and latest_step(tmp_path) == stopped


def test_sigterm_to_one_rank_stops_both_at_the_same_step(cache, tmp_path, launch_env):  # noqa: F811
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = start(
        [*torchrun, "train.py", *cache, *ARGS, f"train.steps={LONG}", f"hydra.run.dir={tmp_path}"], launch_env
    )
    wait_for_step(tmp_path, 2, proc)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2
    subprocess.run(["kill", "-TERM", workers[1]], check=True)  # rank 1 only; a scheduler may do that
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = max(r["step"] for r in records(tmp_path / "metrics.jsonl"))
    assert stopped < LONG and latest_step(tmp_path) == stopped
    checkpoint = tmp_path / "checkpoints" / f"step_{stopped:06d}"
    assert (checkpoint / "complete.json").is_file()
    assert sorted(p.name for p in checkpoint.glob("rng_rank_*.pt")) == ["rng_rank_000.pt", "rng_rank_001.pt"]
