"""sample.py from the command line on an exported diffusers transformer (save_pretrained -> from_pretrained),
and its errors for bad checkpoint paths."""

import subprocess
import sys
from pathlib import Path

import decord
import pytest
import torch

from models.config import TransformerConfig
from models.transformer import build_transformer
from training.checkpoint import resolve_transformer_dir

ROOT = Path(__file__).resolve().parents[1]


def test_sample_cli_writes_decodable_videos_of_the_requested_size(tmp_path, launch_env):
    build_transformer(TransformerConfig(arch="tiny", seed=3)).save_pretrained(tmp_path / "exported")
    (tmp_path / "prompts.txt").write_text("a cat sleeping on a table\n\na red ball\n")
    cmd = [
        sys.executable, "sample.py", f"checkpoint={tmp_path / 'exported'}", "attention=full",
        f"prompts_file={tmp_path / 'prompts.txt'}", "steps=2", "frames=9", "height=32", "width=64",
        "guidance=3",
        f"output_dir={tmp_path / 'out'}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=launch_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    videos = sorted((tmp_path / "out").glob("*.mp4"))
    assert [v.name for v in videos] == ["prompt_00.mp4", "prompt_01.mp4"]  # the blank line is skipped
    for video in videos:
        reader = decord.VideoReader(str(video))
        assert len(reader) == 9 and reader[0].shape == (32, 64, 3)
    # Different prompts, different videos (the text reaches the model through cross-attention).
    a, b = (
        torch.from_numpy(decord.VideoReader(str(v)).get_batch(range(9)).asnumpy()).float() for v in videos
    )
    assert (a - b).abs().mean() > 0.5
    assert "prompt_01: " in done.stdout


def test_checkpoint_paths_resolve_or_fail_clearly(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    (ckpt / "transformer").mkdir(parents=True)
    (ckpt / "transformer" / "config.json").write_text("{}")
    (ckpt / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000002\n")
    assert resolve_transformer_dir(tmp_path / "run") == ckpt / "transformer"
    assert resolve_transformer_dir(ckpt) == ckpt / "transformer"
    assert resolve_transformer_dir(ckpt / "transformer") == ckpt / "transformer"
    with pytest.raises(FileNotFoundError, match="no transformer_ema/ export.*ema.enabled"):
        resolve_transformer_dir(ckpt, use_ema=True)
    with pytest.raises(FileNotFoundError, match=r"checkpoint=.*nowhere: expected a run dir"):
        resolve_transformer_dir(tmp_path / "nowhere")
