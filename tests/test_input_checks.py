"""Inputs that used to fail late or silently: a video size the VAE x patch strides reject (checked before
any sampling, naming the key and the nearest valid values), a VMoBA top-k covering every block (warned
once), and sample.py's progress bar (denoising steps, not prompts)."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from data.config import DataConfig
from models.config import AttentionConfig, ModelConfig
from models.encoders import VAEConfig, build_vae
from models.strides import VideoStrides
from schema import ConfigError
from training.config import GenerationConfig, ObjectiveConfig
from training.objective import FlowMatching
from training.sampling import PromptSampler
from training.stack import build_stack
from vmoba import VMoBAConfig, vmoba_attention
from vmoba import attention as vmoba_attention_module

ROOT = Path(__file__).resolve().parents[1]


def run_sample(tmp_path, env, *overrides):
    cmd = [
        sys.executable, "sample.py", "attention=full", "prompts=[a cat,a red ball]",
        f"output_dir={tmp_path / 'out'}", *overrides,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_sample_py_rejects_a_size_off_the_vae_x_patch_stride_before_sampling(tmp_path, launch_env):
    """136 is a multiple of the VAE's 8 but not of 8 x patch 2: one line naming the key, exit 2, no video."""
    done = run_sample(tmp_path, launch_env, "height=136", "frames=16")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "config error: frames=16: must be 4k + 1 (VAE 4 x patch 1); use 13 or 17; "
        "height=136: must be a multiple of 16 (VAE 8 x patch 2); use 128 or 144"
    )
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "out").glob("*.mp4"))


def test_sample_py_progress_bar_counts_denoising_steps(tmp_path, launch_env):
    """2 prompts x 3 steps: the bar's total is 6 and it passes every step (printed at each update)."""
    env = {**launch_env, "TQDM_MININTERVAL": "0"}  # tqdm reads its defaults from TQDM_* at import
    done = run_sample(tmp_path, env, "steps=3", "frames=5", "height=32", "width=32")
    assert done.returncode == 0, done.stderr[-3000:]
    shown = {f"{n}/6" for n in range(7) if f"| {n}/6 [" in done.stderr}
    assert shown == {f"{n}/6" for n in range(7)}, done.stderr[-3000:]
    assert "prompt 2/2" in done.stderr
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 2


def test_training_samples_check_the_built_models_strides():
    """train.py's PromptSampler names the `sample.` key; the strides come from the built VAE and patch."""
    stack = build_stack(
        ModelConfig(), AttentionConfig(type="full"), ObjectiveConfig(), torch.device("cpu"), precision="fp32"
    )
    args = (FlowMatching(ObjectiveConfig()), stack.text_encoder, stack.vae, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^sample\.width=40: must be a multiple of 16 .*; use 32 or 48$"):
        PromptSampler(GenerationConfig(width=40), *args, transformer=stack.transformer)
    sampler = PromptSampler(
        GenerationConfig(frames=5, height=48, width=32), *args, transformer=stack.transformer
    )
    assert sampler.noise.shape == (1, 4, 2, 6, 4)  # latents [N, z_dim, (5 - 1) / 4 + 1, 48 / 8, 32 / 8]


def test_strides_come_from_the_vae_and_the_patch_size():
    vae = build_vae(VAEConfig())
    # CogVideoX's int patch with a temporal patch (as CogVideoX 1.5): latent frames must pair up.
    cog = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=1, patch_size=2, patch_size_t=2, max_text_seq_length=8,
        sample_width=16, sample_height=16, sample_frames=17,
    )  # fmt: skip
    strides = VideoStrides.of(vae, cog)
    assert strides == VideoStrides(vae_t=4, vae_s=8, patch_t=2, patch_h=2, patch_w=2)
    strides.check(21, 32, 48)  # 6 latent frames: fits
    with pytest.raises(
        ConfigError,
        match=r"^frames=17: must be 4k \+ 1 with k \+ 1 a multiple of 2 \(VAE 4 x patch 2\); use 13 or 21$",
    ):
        strides.check(17, 32, 48)
    with pytest.raises(
        ConfigError, match=r"^height=8: must be a multiple of 16 \(VAE 8 x patch 2\); use 16$"
    ):
        strides.check(21, 8, 48)


def test_data_config_checks_the_same_strides():
    with pytest.raises(ValueError, match=r"^data\.height=136: must be a multiple of 16 \(VAE 8 x patch 2\)"):
        DataConfig(height=136)
    DataConfig(frames=9, height=144, width=32)


def test_topk_covering_every_block_warns_once_per_partition_and_grid():
    """topk_2d=9 on a 2D partition of 4 blocks selects everything: dense attention, said once."""
    vmoba_attention_module._warn_dense_topk.cache_clear()
    cfg = VMoBAConfig(partitions=["2d"], block_2d=(2, 2), selection="topk", topk_2d=9)
    q, k, v = torch.randn(3, 1, 64, 2, 8).unbind(0)  # [B, L, H, D] each
    grid = (4, 4, 4)  # 2D tiles span every frame: (4 / 2) x (4 / 2) = 4 blocks
    with pytest.warns(UserWarning) as record:
        vmoba_attention(q, k, v, grid, cfg)
    assert [str(w.message) for w in record] == [
        "vmoba: topk_2d=9 >= the 4 blocks of the 2d partition of the token grid (4, 4, 4): every query "
        "selects every block, so these layers run dense attention (no sparsity); lower topk_2d or block_2d"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call on the same grid: no warning
        vmoba_attention(q, k, v, grid, cfg)
        # More blocks than topk: a real selection, nothing to say (8 x 8 = 64 blocks).
        vmoba_attention(*torch.randn(3, 1, 256, 2, 8).unbind(0), (1, 16, 16), cfg)
    with pytest.warns(UserWarning, match=r"token grid \(2, 4, 4\)"):  # a new grid warns again, once
        vmoba_attention(*torch.randn(3, 1, 32, 2, 8).unbind(0), (2, 4, 4), cfg)
