"""Build the diffusion transformer: a pretrained diffusers folder / hub id, or a named random-init arch."""

import os
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from diffusers import AutoModel, WanTransformer3DModel
from diffusers.models.modeling_utils import ModelMixin

from models.cogvideox import COGVIDEOX_ARCHS
from models.config import TransformerConfig
from models.wan_block import fuse_wan_blocks


class Arch(NamedTuple):
    """A named architecture: its model family and a factory building it with random weights."""

    family: str
    build: Callable[[], ModelMixin]


# Tiny Wan matches the tiny encoders (VAE z_dim=4, UMT5 d_model=32); head dim 24 splits into the
# 8/8/8 channels Wan's 3-axis RoPE needs; 3 layers so the 1D/2D/3D partitions all appear.
_wan_tiny = partial(
    WanTransformer3DModel,
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=3,
    rope_max_seq_len=256,
)

# Wan-2.1-T2V-1.3B (the released config.json): width 1536 = 12 heads x 128, 30 layers.
_wan_1_3b = partial(
    WanTransformer3DModel,
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)

TRANSFORMER_ARCHS: dict[str, Arch] = {
    "tiny": Arch("wan", _wan_tiny),
    "wan2.1-1.3b": Arch("wan", _wan_1_3b),
    **{name: Arch("cogvideox", build) for name, build in COGVIDEOX_ARCHS.items()},
}


def build_transformer(cfg: TransformerConfig) -> ModelMixin:
    """Return the transformer described by `cfg` (in `cfg.dtype`, on CPU, in train mode).

    `cfg.pretrained` loads through diffusers `AutoModel.from_pretrained` (local folder or hub id; the
    class comes from the folder's config.json, so any family loads); otherwise `cfg.arch` is built with
    random weights drawn from `cfg.seed` without touching the global RNG. Wan blocks get their elementwise
    chains fused on CUDA (`models.wan_block`; same weights, same math).
    """
    dtype = getattr(torch, cfg.dtype)
    if cfg.pretrained is not None:
        try:
            model = AutoModel.from_pretrained(cfg.pretrained, subfolder=cfg.subfolder, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            where = os.path.join(cfg.pretrained, cfg.subfolder or "")
            raise OSError(
                f"model.transformer.pretrained={cfg.pretrained!r} (subfolder={cfg.subfolder!r}): no diffusers "
                f"model at {where!r} (expected config.json + weights) and not loadable as a hub id "
                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {err}"
            ) from err
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = TRANSFORMER_ARCHS[cfg.arch].build()
        if dtype != torch.float32:  # built in fp32; skip a no-op cast (diffusers warns on every `.to`)
            model = model.to(dtype)
    if isinstance(model, WanTransformer3DModel):
        fuse_wan_blocks(model)
    return model.train()
