"""The quality experiment (issue 28): its dataset generator and, marked slow, scripts/quality.py --tiny."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from data.video_io import read_video
from scripts.make_quality_dataset import COLOURS, load_objects, make_quality_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_dataset_is_deterministic_and_objects_move_as_stated(tmp_path):
    a, written = make_quality_dataset(tmp_path / "a", 3, 17, 128, 16.0, seed=7)
    b, _ = make_quality_dataset(tmp_path / "b", 3, 17, 128, 16.0, seed=7)
    c, _ = make_quality_dataset(tmp_path / "c", 3, 17, 128, 16.0, seed=8)
    assert written == 3
    assert [p.with_suffix(".txt").read_text() for p in a] == [p.with_suffix(".txt").read_text() for p in b]
    assert [p.with_suffix(".json").read_text() for p in a] != [p.with_suffix(".json").read_text() for p in c]
    assert make_quality_dataset(tmp_path / "a", 3, 17, 128, 16.0, seed=7)[1] == 0  # complete clips are kept
    for path in a:
        top = load_objects(path)[-1]  # drawn last: never occluded
        video = read_video(path).astype(np.float32) / 255  # [F, H, W, 3]
        centres = top.centres(17, 128)
        colour = np.asarray(COLOURS[top.colour])
        assert top.colour in path.with_suffix(".txt").read_text().split(" moving")[0]
        for f, (x, y) in enumerate(centres):
            patch = video[f, int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3].reshape(-1, 3)
            assert np.abs(patch.mean(0) - colour).max() < 0.12, (path.name, f)
        # Constant speed between frames where it does not turn at an edge.
        steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
        assert np.isclose(np.median(steps), np.hypot(*top.velocity), rtol=1e-6)
        assert np.linalg.norm(centres[-1] - centres[0]) > top.radius  # it really moves
        assert json.loads(path.with_suffix(".json").read_text())["frames"] == 17


@pytest.mark.slow
def test_quality_tiny_end_to_end(tmp_path, monkeypatch):
    from scripts import quality

    monkeypatch.setattr(sys, "argv", ["quality.py", "--tiny"])
    assert (
        quality.main(
            ["--tiny", "--out", str(tmp_path), "--dense-steps", "0", "4", "--wandb-mode", "disabled"]
        )
        == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    sweep = {(r["attention"], r["dense_first_steps"]): r for r in results["sweep"]}
    # Dense for all 4 sampling steps is full attention: (nearly) the reference samples, closer than sparse.
    dense, sparse = sweep[("VMoBA token", 4)], sweep[("VMoBA token", 0)]
    assert dense["psnr"] is None or dense["psnr"] > sparse["psnr"]  # None: identical (inf)
    assert dense["ssim"] > 0.999
    assert sweep[("VMoBA token", 0)]["psnr"] is not None and sweep[("VMoBA token", 0)]["ssim"] < 1
    for c in results["comparisons"]:
        assert c["vmoba"]["val_loss"] is not None and c["equal_time"] is not None
        assert 0 < c["vmoba"]["mean_density"] < 1 and len(c["recall"]) == 3
    assert (tmp_path / "samples.png").is_file() and "![sample frames" in (tmp_path / "results.md").read_text()


def test_a_sigterm_to_quality_py_reaches_the_running_stage_and_ends_the_script(tmp_path):
    """`timeout -s TERM ... scripts/quality.py` (a device's time limit, a preemption): the stage running
    (train.py) gets the signal, so it saves its checkpoint, and the script stops instead of going on."""
    import signal
    import subprocess
    import time

    ready, got = tmp_path / "ready", tmp_path / "got"
    stage = (  # a stand-in for train.py's handler: record the signal, exit 0 as train.py does after saving
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda s, f: (pathlib.Path({str(got)!r}).write_text('TERM'), sys.exit(0)))\n"
        f"pathlib.Path({str(ready)!r}).write_text('')\n"
        "time.sleep(120)\n"
    )
    script = f"from scripts.quality import _run\n_run([{sys.executable!r}, '-c', {stage!r}], 'the stage')\n"
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert got.read_text() == "TERM"
    assert proc.returncode == 1 and "SIGTERM during the stage (its command exited 0)" in err, err
