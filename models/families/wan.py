"""The Wan family: diffusers `WanTransformer3DModel` (self-attention `attn1`, text cross-attention `attn2`).

Its architectures, the latent grid rule, the self-attention processor that hands q, k, v to a
`models.attention` kernel (cross-attention keeps diffusers' processor) and the `model_fn` call.
"""

from functools import partial

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttention, _get_qkv_projections

from models.families.base import Family, Grid, forward_arg
from models.wan_block import fuse_wan_blocks, fused_on_cuda

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

# Mid-size Wan for training from scratch (the quality experiment, configs/experiment/quality.yaml): width
# 768 = 6 heads x 128 (the head dim of Wan-2.1 and of the Hopper kernels; RoPE splits it 44/42/42 over
# t/h/w), 12 layers (the 1D/2D/3D cycle four times), FFN 4x = 3072; 118M parameters. Sized for the
# tiny encoders (VAE z_dim 4, UMT5 d_model 32), so clips cache fast.
_wan_mid = partial(
    WanTransformer3DModel,
    patch_size=(1, 2, 2),
    num_attention_heads=6,
    attention_head_dim=128,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=256,
    ffn_dim=3072,
    num_layers=12,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
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


def _wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs: x [B, L, H, D], freqs [1, L, 1, D] -> [B, L, H, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


# Eagerly, RoPE is ~8 fp32 elementwise kernels per tensor: 4.1 ms forward+backward for one
# [1, 55296, 12, 128] bf16 tensor on an H100, ~0.37 s of a Wan-2.1-1.3B training step (q and k, 30
# layers, forward + checkpoint recompute + backward). Inductor fuses it into one kernel each way (0.54 ms).
def wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """`_wan_rope`, compiled into one fused kernel on CUDA."""
    return fused_on_cuda(_wan_rope, x)(x, freqs_cos, freqs_sin)


class WanSelfAttnProcessor:
    """diffusers' `WanAttnProcessor` for self-attention, with the attention call replaced by `kernel`
    (a `models.attention.LayerAttention`: `(q, k, v: [B, L, H, D]) -> [B, L, H, D]`)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden_states: [B, L, C] video tokens in raster order -> [B, L, C]."""
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanSelfAttnProcessor is for self-attention (attn1): no context, no mask")
        q, k, v = _get_qkv_projections(attn, hidden_states, None)  # (B, L, H*D) each
        q, k = attn.norm_q(q), attn.norm_k(k)  # RMS norm across heads, as Wan does
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))  # (B, L, H, D)
        if rotary_emb is not None:
            q, k = wan_rope(q, *rotary_emb), wan_rope(k, *rotary_emb)
        out = self.kernel(q, k, v).flatten(2, 3).type_as(q)  # (B, L, H*D)
        return attn.to_out[1](attn.to_out[0](out))


def wan_grid(model: WanTransformer3DModel, args: tuple, kwargs: dict) -> Grid:
    """Token grid (T, H, W) of the forward's latents `hidden_states: [B, C, F, H, W]`."""
    p_t, p_h, p_w = model.config.patch_size
    _, _, frames, height, width = forward_arg(args, kwargs, "hidden_states").shape
    return frames // p_t, height // p_h, width // p_w


def wan_call(module, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """x [B, C, F, H, W], timestep [B], text [B, S, D] -> [B, C, F, H, W]."""
    return module(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]


FAMILY = Family(
    name="wan",
    model_class=WanTransformer3DModel,
    archs={"tiny": _wan_tiny, "wan-mid": _wan_mid, "wan2.1-1.3b": _wan_1_3b},
    blocks=lambda model: model.blocks,
    grid=wan_grid,
    processor=WanSelfAttnProcessor,
    call=wan_call,
    prepare=fuse_wan_blocks,  # same math; compiled on CUDA, eager and bitwise diffusers' on the CPU
)
