"""The sweep summary table (training.summary / training.sweep): one column per swept parameter, and a table
for the jobs that finished even when another job of the sweep failed, which is listed with its error line."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml
from test_train import FAST, cache  # noqa: F401  (the module-scoped latent-cache fixture)

from training.summary import SUMMARY_KEYS, write_job_error, write_sweep_table

ROOT = Path(__file__).resolve().parents[1]


def test_train_multirun_with_a_failed_job_writes_the_table_and_lists_the_failure(cache, tmp_path, launch_env):  # noqa: F811
    """A real `train.py -m`: job 00 has a config error (which ends a single run with one line and exit 2),
    job 01 must still train, and the table must have it and list job 00 with its error line."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "train.py", "-m", "train.lr=-1,0.001", "train.steps=1", "sample.every=0", *cache, *FAST,
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=launch_env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0  # Hydra re-raises the failed job's error once every job has run
    assert "train.lr: must be > 0" in done.stderr

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name[:3] for j in jobs] == ["00_", "01_"]
    assert not (jobs[0] / "summary.json").exists() and (jobs[1] / "summary.json").is_file()
    error = json.loads((jobs[0] / "error.json").read_text())
    assert error["error"] == "ConfigError: train.lr: must be > 0, got -1.0"
    assert "Traceback" in error["traceback"]

    table = (sweep / "summary.md").read_text().splitlines()
    # The swept key has its own column; the fixed overrides (train.steps, FAST, ...) do not.
    assert table[0] == "| run | train.lr | " + " | ".join(SUMMARY_KEYS) + " |"
    finished = table[2].split(" | ")
    assert finished[0] == f"| {jobs[1].name}" and finished[1] == "0.001" and math.isfinite(float(finished[2]))
    assert table[3:] == ["", "## Failed jobs (1)", "", f"- `{jobs[0].name}`: {error['error']}"]

    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["status"], r["train.lr"]) for r in rows] == [
        (jobs[1].name, "finished", "0.001"),
        (jobs[0].name, "failed", "-1"),
    ]
    assert rows[1]["error"] == error["error"] and rows[1]["final_loss"] == ""


def _job(sweep: Path, name: str, overrides: list[str], summary: dict | None = None) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    return job


def test_sweep_table_columns_failed_and_unfinished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    # As Hydra writes it: the sweep's own overrides, two swept and one fixed.
    task = ["attention=vmoba,full", "train.lr=0.001,0.002", "train.steps=2"]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
    _job(
        sweep,
        "00",
        ["attention=vmoba", "train.lr=0.001", "train.steps=2"],
        {"final_loss": 0.5, "mem_gb": 1.25},
    )
    _job(sweep, "01", ["attention=vmoba", "train.lr=0.002", "train.steps=2"], {"final_loss": 0.25})
    failed = _job(sweep, "02", ["attention=full", "train.lr=0.001", "train.steps=2"])
    _job(sweep, "03", ["attention=full", "train.lr=0.002", "train.steps=2"])  # still running, or killed
    (sweep / "notes").mkdir()  # not a job dir: no .hydra/, summary.json or error.json
    try:
        raise ValueError("train.lr: must be > 0\nsecond line of detail")
    except ValueError as err:
        write_job_error(failed, err)

    rows = write_sweep_table(sweep)
    assert [r["run"] for r in rows] == ["00", "01"]
    assert rows[0]["attention"] == "vmoba" and rows[1]["train.lr"] == "0.002"
    md = (sweep / "summary.md").read_text()
    assert md.splitlines()[0].startswith("| run | attention | train.lr | final_loss |")
    assert "| 00 | vmoba | 0.001 | 0.5 |" in md and "train.steps" not in md
    assert "## Failed jobs (1)\n\n- `02`: ValueError: train.lr: must be > 0\n" in md
    assert "## Unfinished jobs (1" in md and "- `03`" in md and "notes" not in md
    with open(sweep / "summary.csv") as f:
        statuses = {r["run"]: (r["status"], r["attention"], r["mem_gb"]) for r in csv.DictReader(f)}
    assert statuses == {
        "00": ("finished", "vmoba", "1.25"),
        "01": ("finished", "vmoba", ""),
        "02": ("failed", "full", ""),
        "03": ("unfinished", "full", ""),
    }


def test_swept_keys_without_multirun_yaml_are_the_keys_that_differ(tmp_path):
    sweep = tmp_path / "sweep"
    _job(sweep, "00_a", ["++data.frames=9", "seed=1"], {"final_loss": 1.0})
    _job(sweep, "01_b", ["++data.frames=17", "seed=1"], {"final_loss": 2.0})
    rows = write_sweep_table(sweep)
    assert [(r["run"], r["data.frames"]) for r in rows] == [("00_a", "9"), ("01_b", "17")]
    assert "seed" not in rows[0]
