"""The comparison from two tiny real runs: train.py's `train` (real Hydra composition, DeepSpeed on CPU,
wandb offline) runs VMoBA and full attention from one latent cache; the report is written from their run
dirs, and `scripts/evaluate.py` re-evaluates the VMoBA checkpoint and must reproduce the run's own eval.
The `--launch` path (train.py as subprocesses) is the same with more process start-up: marked slow."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from data.cache import cache_dataset
from data.video_io import write_video
from evaluation.report import write_report
from training.config import load_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
# Top-1 VMoBA attends to its own block only, so it differs clearly from full attention.
VMOBA_ONLY = ["attention.selection=topk", "attention.topk_1d=1", "attention.topk_2d=1", "attention.topk_3d=1"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return load_config(compose(config_name="train", overrides=overrides))


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
    """Hydra overrides shared by both runs: a fresh latent cache of 3 clips (one held out), 3 steps."""
    root = tmp_path_factory.mktemp("compare_data")
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(9).view(1, 9, 1, 1)
    y, x = torch.meshgrid(torch.linspace(0, 3, 64), torch.linspace(0, 3, 64), indexing="ij")
    for i, caption in enumerate(["a red ball", "a city street", "a sleeping cat"]):
        phase = torch.rand(3, 1, 1, 1, generator=gen) * 6
        video = torch.sin(x + 0.3 * (i + 1) * t + phase) * torch.cos(y - 0.2 * t + i)  # [3, F, H, W]
        write_video(root / "clips" / f"clip{i}.mp4", video.clamp(-1, 1), fps=8)
        (root / "clips" / f"clip{i}.txt").write_text(caption)
    # 9 frames at 64x64 -> latents 3x8x8 -> 3x4x4 = 48 tokens: several blocks in every partition.
    data = dict(source=root / "clips", cache_dir=root / "cache", frames=9, height=64, width=64, num_workers=0)
    # `++`: the keys may be left to the schema's defaults rather than set in configs/data/*.yaml.
    shared = [f"++data.{k}={v}" for k, v in data.items()] + ["++data.val_keys=[clip2]"]
    shared += [
        f"train.steps={STEPS}", "train.warmup_steps=0", "eval.every=1", "eval.num_batches=1", "eval.timesteps=[0.5]",
        "sample.every=0", "sample.steps=2", "sample.prompts=[a red ball]", f"checkpoint.every={STEPS}",
        "wandb.mode=disabled",  # the report's own wandb run is what this file checks
    ]  # fmt: skip
    # The cache is built from the same composed config that train.py validates it against.
    cfg = _compose(shared)
    cache_dataset(cfg.model.vae, cfg.model.text_encoder, cfg.data, progress=False)
    return shared


@pytest.fixture(scope="module")
def runs(overrides, tmp_path_factory) -> Path:
    from train import train

    root = tmp_path_factory.mktemp("compare_runs")
    train(_compose(["attention=vmoba", *overrides, *VMOBA_ONLY]), root / "vmoba", name="vmoba")
    train(_compose(["attention=full", *overrides]), root / "full", name="full")
    return root


def _check_report(report: Path) -> None:
    numbers = json.loads((report / "report.json").read_text())
    vm, full, fid = numbers["VMoBA"], numbers["full"], numbers["fidelity"]
    for run in (vm, full):
        assert math.isfinite(run["final_loss"]) and math.isfinite(run["val_loss"]) and run["step_time"] > 0
    assert full["mean_density"] == pytest.approx(1.0) and full["mean_recall"] == pytest.approx(1.0)
    assert 0 < vm["mean_density"] < 0.6 and 0 < vm["mean_recall"] < 1
    # Same prompt and noise, different attention: related but not identical samples.
    assert fid["step"] == STEPS and fid["videos"] == 1
    assert math.isfinite(fid["psnr"]) and fid["psnr"] > 5 and -1 < fid["ssim"] < 1
    text = (report / "report.md").read_text()
    assert "| speedup (full step time / VMoBA step time) |" in text and "PSNR VMoBA vs full" in text
    assert all(
        (report / f"{name}.png").stat().st_size > 10_000 for name in ("loss_vs_step", "attention_per_layer")
    )
    assert list((report / "wandb").glob("offline-run-*/run-*.wandb"))


def test_report_from_two_tiny_real_runs(runs, tmp_path):
    write_report(runs / "vmoba", runs / "full", tmp_path / "report", wandb_mode="offline")
    _check_report(tmp_path / "report")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_reproduces_the_runs_own_evaluation(runs, tmp_path):
    evaluate = _script("evaluate")
    run = runs / "vmoba"
    evaluate.main([str(run), "--out", str(tmp_path / "vmoba.json")])
    got = json.loads((tmp_path / "vmoba.json").read_text())
    last_eval = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert got["step"] == last_eval["step"] == STEPS and got["attention"] == "vmoba"
    # Same weights, clips, timesteps and noise as the trainer's evaluation: the same loss.
    assert got["val_loss"] == pytest.approx(last_eval["val_loss"], rel=1e-5)
    assert {"recall/1d", "recall/2d", "recall/3d", "density/mean"} <= set(got) and 0 < got["recall/mean"] < 1

    # The same checkpoint with dense attention: recall and density 1, and a different loss.
    evaluate.main([str(run), "attention.type=full", "--out", str(tmp_path / "full.json")])
    dense = json.loads((tmp_path / "full.json").read_text())
    assert dense["recall/mean"] == pytest.approx(1.0) and dense["density/mean"] == pytest.approx(1.0)
    assert dense["val_loss"] != pytest.approx(got["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_compare_launch_trains_both_runs_and_reports(overrides, tmp_path, launch_env):
    cmd = [sys.executable, "scripts/compare.py", "--launch", "--out", str(tmp_path / "report")]
    cmd += [f"--vmoba-set={o}" for o in VMOBA_ONLY] + ["--", *overrides]
    result = subprocess.run(cmd, cwd=REPO, env=launch_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _check_report(tmp_path / "report")
    assert "type: full" in (tmp_path / "report" / "runs" / "full" / "config.yaml").read_text()
    # Both runs in one wandb group named after --out, which the report's run records and joins.
    from test_compare import offline_run_record

    for run in ("vmoba", "full"):
        config = yaml.safe_load((tmp_path / "report" / "runs" / run / "config.yaml").read_text())
        assert config["wandb"]["group"] == "report", run
        summary = json.loads((tmp_path / "report" / "runs" / run / "summary.json").read_text())
        assert summary["name"].startswith("attention=") and "wandb.group" not in summary["name"], run
    assert offline_run_record(tmp_path / "report").run_group == "report"


def test_evaluate_rejects_bad_overrides_naming_the_key(runs):
    from training.config import ConfigError

    evaluate = _script("evaluate")
    with pytest.raises(ConfigError, match="attention.nope"):
        evaluate.main([str(runs / "vmoba"), "attention.nope=1"])
    with pytest.raises(ValueError, match="timesteps: must be values in"):
        evaluate.main([str(runs / "vmoba"), "--timesteps", "1.5"])
    with pytest.raises(FileNotFoundError, match="expected a run dir"):
        evaluate.main([str(runs)])
