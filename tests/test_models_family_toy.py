"""Adding a model family is one file plus a registry line: a toy third family (diffusers' LTX-Video
transformer, tiny) registered here trains one step through install_attention + make_model_fn + the loss."""

from functools import partial

import pytest
import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

import models.families as families
from models.attention import install_attention
from models.config import AttentionConfig, ModelConfig, TransformerConfig
from models.families import Family, forward_arg
from models.transformer import build_transformer
from training.config import ObjectiveConfig
from training.model_fn import make_model_fn
from training.objective import FlowMatching

# ---- what models/families/ltx.py would hold (docs/models.md, "Adding a model family")

_ltx_tiny = partial(
    LTXVideoTransformer3DModel,
    in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=24,
    cross_attention_dim=48, num_layers=3, caption_channels=32,
)  # fmt: skip


class LTXSelfAttnProcessor:
    """diffusers' `LTXVideoAttnProcessor` for self-attention with the attention call replaced by `kernel`."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        """hidden_states: [B, L, C] video tokens in raster order -> [B, L, C]."""
        q, k = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(hidden_states))
        if image_rotary_emb is not None:
            q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, attn.to_v(hidden_states)))
        out = self.kernel(q, k, v).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def ltx_grid(model, args, kwargs):
    return tuple(
        forward_arg(args, kwargs, name, i) for i, name in ((4, "num_frames"), (5, "height"), (6, "width"))
    )


def ltx_call(module, x, timestep, text):
    """x [B, C, F, H, W] -> LTX's tokens [B, F*H*W, C] (patch size 1) and back."""
    b, c, f, h, w = x.shape
    out = module(
        hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=text, timestep=timestep,
        encoder_attention_mask=None, num_frames=f, height=h, width=w, return_dict=False,
    )[0]  # fmt: skip
    return out.transpose(1, 2).reshape(b, c, f, h, w)


FAMILY = Family(
    name="ltx",
    model_class=LTXVideoTransformer3DModel,
    archs={"ltx-tiny": _ltx_tiny},
    blocks=lambda model: model.transformer_blocks,
    grid=ltx_grid,
    processor=LTXSelfAttnProcessor,
    call=ltx_call,
)

# ---- the tests


@pytest.fixture
def ltx():
    """The registry line (`register(ltx.FAMILY)`), undone after the test."""
    families.register(FAMILY)
    yield FAMILY
    del families.FAMILIES[FAMILY.name]
    for name in FAMILY.archs:
        del families.ARCHS[name]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 3, 8, 8, generator=g)
    return latents, {"text_emb": torch.randn(2, 5, 32, generator=g), "text_mask": torch.ones(2, 5)}


def test_registered_family_validates_and_its_full_processor_equals_diffusers(ltx):
    with pytest.raises(ValueError, match="ltx"):
        families.register(FAMILY)  # names are unique
    assert ModelConfig(family="ltx", transformer=TransformerConfig(arch="ltx-tiny")).family == "ltx"
    model = build_transformer(TransformerConfig(arch="ltx-tiny"))
    assert families.family_of(model) is ltx
    latents, cond = _batch()
    model_fn = make_model_fn(model, "ltx", 1000, torch.float32)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        expected = model_fn(latents, t, cond)  # diffusers' own processors
        ctrl = install_attention(model, AttentionConfig(type="full"))
        torch.testing.assert_close(model_fn(latents, t, cond), expected, rtol=1e-5, atol=1e-5)
    assert ctrl.grid == (3, 8, 8)


def test_registered_family_trains_one_step_with_vmoba(ltx):
    model = build_transformer(TransformerConfig(arch="ltx-tiny"))
    cfg = AttentionConfig(  # sparse on the 3x8x8 grid: 1 of 3 frames, 2 of 8 tiles, 2 of 12 cubes
        block_1d=1, block_2d=(2, 4), block_3d=(1, 4, 4), selection="topk", topk_1d=1, topk_2d=2, topk_3d=2
    )
    ctrl = install_attention(model, cfg)
    model_fn = make_model_fn(model, "ltx", 1000, torch.float32)
    objective = FlowMatching(ObjectiveConfig())
    latents, cond = _batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = objective.loss(model_fn, latents, cond, generator=torch.Generator().manual_seed(0))
    loss.backward()
    grads = [model.transformer_blocks[i].attn1.to_q.weight.grad for i in range(3)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert all(0 < ctrl.stats()[f"density/layer_{i:02d}"] < 1 for i in range(3))  # VMoBA ran, sparse
    before = model.proj_in.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.proj_in.weight, before)
