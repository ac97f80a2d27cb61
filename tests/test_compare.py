"""evaluation.report / scripts/compare.py on two run dirs written in train.py's run-directory format."""

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import yaml

from data.video_io import read_video, write_video
from evaluation import metrics, report

REPO = Path(__file__).resolve().parents[1]


def _write_run(
    root: Path, *, step_time: float, loss0: float, density: list[float], recall: list[float], videos
):
    root.mkdir(parents=True)
    config = {
        "seed": 0,
        "attention": {"partitions": ["1d", "2d", "3d"]},
        "sample": {"prompts": ["a cat", "a dog"]},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    with open(root / "metrics.jsonl", "w") as f:
        for step in range(1, 21):
            record = {
                "step": step,
                "time": step * step_time,
                "loss": loss0 / step,
                # The first step is a slow warm-up; the table's median skips it.
                "step_time": 10 * step_time if step == 1 else step_time,
                "tokens_per_s": 100 / step_time,
                "mem_gb": 1.0 + step / 100,
            }
            record.update({f"density/layer_{i:02d}": d for i, d in enumerate(density)})
            f.write(json.dumps(record) + "\n")
    with open(root / "eval.jsonl", "w") as f:
        for step, val in ((10, loss0 / 5), (20, loss0 / 10)):
            record = {"step": step, "time": step * step_time, "val_loss": val}
            record.update({f"recall/layer_{i:02d}": r for i, r in enumerate(recall)})
            f.write(json.dumps(record) + "\n")
    for step, clips in videos.items():
        for i, clip in enumerate(clips):
            write_video(root / "samples" / f"step_{step:06d}" / f"prompt_{i:02d}.mp4", clip, fps=8)


def _smooth_video(gen, frames=4, size=32):
    """[3, F, H, W] in [-1, 1], smooth enough that H.264 keeps it close."""
    low = torch.rand(1, 3 * frames, 4, 4, generator=gen)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (up.reshape(3, frames, size, size) * 1.6 - 0.8).clamp(-1, 1)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    gen = torch.Generator().manual_seed(0)
    base = [_smooth_video(gen) for _ in range(2)]
    noisy = [(v + 0.1 * torch.randn(v.shape, generator=gen)).clamp(-1, 1) for v in base]
    _write_run(
        root / "vmoba", step_time=1.0, loss0=2.0, density=[0.2, 0.4, 0.6, 0.3], recall=[0.9, 0.8, 0.7, 0.95],
        videos={10: noisy, 30: noisy},  # step 30 exists only here: the report must use step 10
    )  # fmt: skip
    _write_run(
        root / "full", step_time=2.0, loss0=1.0, density=[1.0] * 4, recall=[1.0] * 4, videos={10: base}
    )
    return root


def test_report_from_two_run_dirs(two_runs, tmp_path):
    out = tmp_path / "report"
    md = report.write_report(two_runs / "vmoba", two_runs / "full", out, wandb_mode="offline")
    text = md.read_text()
    numbers = json.loads((out / "report.json").read_text())
    vm, full, fid = numbers["VMoBA"], numbers["full"], numbers["fidelity"]

    # Hand-computed from what _write_run logged.
    assert vm["step_time"] == pytest.approx(1.0) and full["step_time"] == pytest.approx(2.0)
    assert vm["final_loss"] == pytest.approx(np.mean([2.0 / s for s in range(11, 21)]))
    assert vm["val_loss"] == pytest.approx(0.2) and full["val_loss"] == pytest.approx(0.1)
    assert vm["peak_mem_gb"] == pytest.approx(1.2) and vm["wall_time"] == pytest.approx(20.0)
    assert vm["mean_density"] == pytest.approx(0.375) and full["mean_density"] == pytest.approx(1.0)
    assert vm["mean_recall"] == pytest.approx(0.8375)
    assert "| speedup (full step time / VMoBA step time) | 2 | 1 |  |" in text
    assert "| validation loss (last eval) | 0.2 | 0.1 | 2 |" in text

    # Fidelity of the step both runs sampled, against the metrics on the decoded files themselves.
    assert fid["step"] == 10 and fid["videos"] == 2

    def decoded(run):
        clips = [read_video(two_runs / run / "samples/step_000010" / f"prompt_{i:02d}.mp4") for i in range(2)]
        return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1

    a, b = decoded("vmoba"), decoded("full")
    assert fid["psnr"] == pytest.approx(float(metrics.psnr(a, b).mean()), rel=1e-5)
    assert fid["ssim"] == pytest.approx(float(metrics.ssim(a, b).mean()), rel=1e-5)
    assert 10 < fid["psnr"] < 40 and 0 < fid["ssim"] < 1

    for name in report.PLOTS:
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.shape[0] > 100 and image.std() > 0.01, name  # a drawn figure, not a blank canvas
        assert f"({name}.png)" in text
    # Runs with no wandb group of their own: the report's run is grouped by the dir that holds both.
    run = offline_run_record(out)
    assert run.run_group == two_runs.name and run.job_type == "compare"
    assert _config(run)["baseline"]["run_dir"] == str((two_runs / "full").resolve())


def offline_run_record(wandb_parent: Path):
    """The RunRecord (id, group, job type, config) of the one offline wandb run under `wandb_parent/wandb`,
    read from its `.wandb` file: offline wandb writes no config.yaml, and wandb ships no reader. The file is
    a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each a 7-byte header (crc32, length,
    kind: 1 full, 2 first, 3 middle, 4 last) and a piece of a serialised `Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (wandb_parent / "wandb").glob("offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pieces, pos = pieces + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            if record.WhichOneof("record_type") == "run":
                return record.run
            pieces = b""
    raise AssertionError(f"{path}: no run record")


def _config(run) -> dict:
    return {item.key: json.loads(item.value_json) for item in run.config.update}


def test_report_run_records_the_compared_runs_and_joins_their_group(two_runs, tmp_path):
    """The report's wandb run names both runs (dir, name, wandb id) in its config and is in their group,
    which the baseline set only when resuming (its last segment's config)."""
    runs = tmp_path / "runs"
    shutil.copytree(two_runs, runs)
    for role, run_id in (("vmoba", "vm000001"), ("full", "fu000002")):
        (runs / role / "wandb").mkdir()
        (runs / role / "wandb" / "run_id").write_text(run_id)
    (runs / "vmoba" / "summary.json").write_text(json.dumps({"name": "attention=vmoba,seed=0"}))
    config = yaml.safe_load((runs / "vmoba" / "config.yaml").read_text())
    grouped = yaml.safe_dump({**config, "wandb": {"group": "ablation"}})
    (runs / "vmoba" / "config.yaml").write_text(grouped)
    (runs / "full" / "config.resume-000010.yaml").write_text(grouped)

    report.write_report(runs / "vmoba", runs / "full", tmp_path / "out", wandb_mode="offline")
    run = offline_run_record(tmp_path / "out")
    assert run.run_group == "ablation" and run.display_name == "compare-vmoba-vs-full"
    compared = _config(run)
    assert compared["vmoba"] == {
        "run_dir": str((runs / "vmoba").resolve()),
        "name": "attention=vmoba,seed=0",
        "wandb_id": "vm000001",
        "wandb_group": "ablation",
    }
    assert compared["baseline"] == {
        "run_dir": str((runs / "full").resolve()),
        "name": "full",  # no summary.json: the dir's name
        "wandb_id": "fu000002",
        "wandb_group": "ablation",
    }


def test_trainer_logs_into_the_configured_wandb_group(tmp_path):
    """`wandb.group` reaches the training run's wandb record (with the run id kept in `wandb/run_id`)."""
    from training.config import WandbConfig
    from training.logger import RunLogger

    cfg = WandbConfig(mode="offline", group="ablation")
    logger = RunLogger(tmp_path, cfg, name="attention=vmoba", config={"seed": 0}, total_steps=1)
    logger.close()
    run = offline_run_record(tmp_path)
    assert run.run_group == "ablation" and run.run_id == (tmp_path / "wandb" / "run_id").read_text()
    assert _config(run)["seed"] == 0


def test_report_without_common_samples_or_evals(two_runs, tmp_path):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": 1.0, "loss": 1.0}) + "\n")
    md = report.write_report(two_runs / "vmoba", tmp_path / "bare", tmp_path / "out", wandb_mode="disabled")
    text = md.read_text()
    assert "PSNR/SSIM are not reported" in text
    assert "| validation loss (last eval) | 0.2 | - | - |" in text
    assert not (tmp_path / "out" / "wandb").exists()


def test_report_rejects_a_dir_that_is_not_a_run(tmp_path, two_runs):
    with pytest.raises(FileNotFoundError, match=r"full run .*nothing: no metrics.jsonl"):
        report.write_report(two_runs / "vmoba", tmp_path / "nothing", tmp_path / "out", wandb_mode="disabled")
    with pytest.raises(ValueError, match="wandb_mode: got 'yes'"):
        report.write_report(two_runs / "vmoba", two_runs / "full", tmp_path / "out", wandb_mode="yes")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_script_on_run_dirs(two_runs, tmp_path, capsys):
    compare = _script("compare")
    out = tmp_path / "cli"
    compare.main(
        [
            "--vmoba",
            str(two_runs / "vmoba"),
            "--baseline",
            str(two_runs / "full"),
            "--out",
            str(out),
            "--wandb-mode",
            "disabled",
        ]
    )
    assert (out / "report.md").is_file() and str(out / "report.md") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        compare.parse_args(["--vmoba", str(two_runs / "vmoba"), "--out", str(out)])
    assert "--baseline RUN_DIR, or --launch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--launch", "--vmoba", "x", "--out", str(out)])
    assert "drop --vmoba/--baseline" in capsys.readouterr().err


def test_report_of_a_run_against_its_copy(two_runs, tmp_path):
    shutil.copytree(two_runs / "vmoba", tmp_path / "copy")
    md = report.write_report(two_runs / "vmoba", tmp_path / "copy", tmp_path / "out", wandb_mode="disabled")
    fid = json.loads((tmp_path / "out" / "report.json").read_text())["fidelity"]  # strict JSON
    assert fid["psnr"] is None and fid["ssim"] == pytest.approx(1.0)  # identical samples: PSNR inf
    text = md.read_text()
    assert "| speedup (full step time / VMoBA step time) | 1 | 1 |  |" in text and "| inf |" in text


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_report_with_feature_networks_uses_each_samples_prompt(two_runs, tmp_path):
    from test_metrics import _tiny_clip, _TinyI3D

    _tiny_clip(tmp_path / "clip")
    torch.jit.script(_TinyI3D()).save(str(tmp_path / "i3d.pt"))
    cfg = metrics.FeatureMetricsConfig(clip=str(tmp_path / "clip"), i3d=str(tmp_path / "i3d.pt"), i3d_size=32)
    nets = metrics.load_feature_networks(cfg)
    md = report.write_report(
        two_runs / "vmoba", two_runs / "full", tmp_path / "out", networks=nets, wandb_mode="disabled"
    )
    fid = json.loads((tmp_path / "out" / "report.json").read_text())["fidelity"]

    clips = [read_video(two_runs / "vmoba/samples/step_000010" / f"prompt_{i:02d}.mp4") for i in range(2)]
    videos = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    model, processor = nets.clip
    # prompt_00 is "a cat", prompt_01 "a dog" (the run's sample.prompts).
    expected = metrics.clip_score(model, processor, videos, ["a cat", "a dog"]).mean()
    assert fid["clip_score_a"] == pytest.approx(float(expected), rel=1e-5)
    assert fid["fvd"] > 0 and "| FVD VMoBA vs full |" in md.read_text() and "| CLIP score |" in md.read_text()
