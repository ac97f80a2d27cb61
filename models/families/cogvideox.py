"""The CogVideoX family: diffusers `CogVideoXTransformer3DModel` (joint text+video self-attention).

CogVideoX has no cross-attention: each block's `attn1` runs over one sequence `[text (S) | video (L)]`.
Text tokens are handled as follows (see docs/models.md, "CogVideoX: text tokens"):

- text queries attend densely to every key (text and video);
- video queries attend to every text key plus the VMoBA-selected video blocks; the gate scores and
  selects video blocks only (text is not a block of the grid), so with everything selected the
  result equals dense joint attention exactly.

The video part runs through the VMoBA kernel on the video grid; the text keys are merged in exactly by
a log-sum-exp combination (`models.attention`). This module holds the architectures, the processor,
the grid rule and the `model_fn` call.
"""

from functools import partial

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb

from models.families.base import Family, Grid, forward_arg

# Tiny CogVideoX: 2 heads x 16, 3 layers (1D/2D/3D all appear), 4 latent channels and text width 32 to
# match the tiny encoders. Sincos positions (no RoPE, like CogVideoX-2b); the sample size is only the
# cached position table, other sizes are computed on the fly. `max_text_seq_length` is the fixed text
# length CogVideoX requires (the position table spans it).
_cogvideox_tiny = partial(
    CogVideoXTransformer3DModel,
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    time_embed_dim=16,
    text_embed_dim=32,
    num_layers=3,
    sample_width=16,
    sample_height=16,
    sample_frames=17,
    patch_size=2,
    max_text_seq_length=8,
)

# CogVideoX-2b (the released transformer config): 30 heads x 64, 30 layers, T5-XXL text (4096), 226 tokens.
_cogvideox_2b = partial(
    CogVideoXTransformer3DModel,
    num_attention_heads=30,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    time_embed_dim=512,
    text_embed_dim=4096,
    num_layers=30,
    sample_width=90,
    sample_height=60,
    sample_frames=49,
    patch_size=2,
    max_text_seq_length=226,
)


def cogvideox_grid(model: CogVideoXTransformer3DModel, args: tuple, kwargs: dict) -> Grid:
    """Token grid (T, H, W) of the forward's latents `hidden_states: [B, F, C, H, W]` (frames first)."""
    frames, _, height, width = forward_arg(args, kwargs, "hidden_states").shape[1:]
    p, p_t = model.config.patch_size, model.config.patch_size_t or 1
    return frames // p_t, height // p, width // p


class CogVideoXSelfAttnProcessor:
    """diffusers' `CogVideoXAttnProcessor2_0` with the attention call replaced by `kernel`.

    `kernel(q, k, v, num_text=S) -> out`, all `[B, S + L, H, D]` with the S text tokens first; it is a
    `models.attention` kernel (full SDPA or VMoBA) bound to this layer. Parameter-free: the weights stay
    in the `Attention` module, so one checkpoint runs with either kernel.
    """

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: [B, L, C] video, encoder_hidden_states: [B, S, C] text -> ([B, L, C], [B, S, C])."""
        if attention_mask is not None:
            raise ValueError(
                "CogVideoXSelfAttnProcessor: attention_mask is not supported (CogVideoX passes none)"
            )
        num_text = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, S+L, C)
        q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:  # LayerNorm over head_dim: layout-independent
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:  # RoPE on video tokens only, as diffusers does
            q = torch.cat(
                [q[:, :num_text], apply_rotary_emb(q[:, num_text:], image_rotary_emb, sequence_dim=1)], 1
            )
            k = torch.cat(
                [k[:, :num_text], apply_rotary_emb(k[:, num_text:], image_rotary_emb, sequence_dim=1)], 1
            )
        out = self.kernel(q, k, v, num_text=num_text).flatten(2, 3)  # (B, S+L, H*D)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, num_text:], out[:, :num_text]


def cogvideox_call(module, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """x [B, C, F, H, W], timestep [B], text [B, S, D] -> [B, C, F, H, W]; CogVideoX itself takes and
    returns [B, F, C, H, W]."""
    out = module(
        hidden_states=x.transpose(1, 2), encoder_hidden_states=text, timestep=timestep, return_dict=False
    )
    return out[0].transpose(1, 2)


FAMILY = Family(
    name="cogvideox",
    model_class=CogVideoXTransformer3DModel,
    archs={"cogvideox-tiny": _cogvideox_tiny, "cogvideox-2b": _cogvideox_2b},
    blocks=lambda model: model.transformer_blocks,
    grid=cogvideox_grid,
    processor=CogVideoXSelfAttnProcessor,
    call=cogvideox_call,
)
