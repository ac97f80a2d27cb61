"""models/families/cogvideox.py: the second family (joint text+video attention) through the same processors."""

import pytest
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

import vmoba
from models.attention import AttentionController, VMoBAAttention, install_attention
from models.checkpointing import enable_checkpointing
from models.config import AttentionConfig, TransformerConfig
from models.families.cogvideox import CogVideoXSelfAttnProcessor
from models.transformer import build_transformer

TINY_BLOCKS = dict(block_1d=1, block_2d=(2, 4), block_3d=(2, 4, 4), granularity="token")
ALL_BLOCKS = dict(selection="topk", topk_1d=64, topk_2d=64, topk_3d=64)


def _inputs(shape=(2, 5, 4, 16, 16), seed=0):
    """Random CogVideoX inputs in fp64: latents [B, F, C, H, W], text [B, 8, 32], timesteps [B]."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=g, dtype=torch.float64)
    text = torch.randn(shape[0], 8, 32, generator=g, dtype=torch.float64)
    return latents, text, torch.rand(shape[0], generator=g, dtype=torch.float64) * 1000


def _cog():
    return build_transformer(TransformerConfig(arch="cogvideox-tiny")).double()


def _run(model, inputs):
    latents, text, t = inputs
    return model(hidden_states=latents, encoder_hidden_states=text, timestep=t).sample


def test_roundtrip_through_automodel(tmp_path):
    model = build_transformer(TransformerConfig(arch="cogvideox-tiny", seed=2))
    model.save_pretrained(tmp_path)
    loaded = build_transformer(TransformerConfig(arch=None, pretrained=str(tmp_path)))
    assert type(loaded) is type(model)
    latents, text, t = (x.float() for x in _inputs())
    torch.testing.assert_close(
        loaded(latents, text, t).sample, model(latents, text, t).sample, rtol=0, atol=0
    )


def test_full_processor_equals_diffusers_processor_and_vmoba_all_selected_equals_full():
    model, inputs = _cog(), _inputs()
    expected = _run(model, inputs)
    ctrl = install_attention(model, AttentionConfig(type="full"))
    torch.testing.assert_close(_run(model, inputs), expected, rtol=0, atol=1e-12)
    assert ctrl.grid == (5, 8, 8)
    install_attention(model, AttentionConfig(type="vmoba", **{**TINY_BLOCKS, **ALL_BLOCKS}))
    torch.testing.assert_close(_run(model, inputs), expected, rtol=0, atol=1e-10)
    install_attention(model, AttentionConfig(type="vmoba", **TINY_BLOCKS))
    assert (_run(model, inputs) - expected).abs().max() > 1e-3


def test_processor_applies_rope_to_video_tokens_like_diffusers():
    model = _cog()
    attn = model.transformer_blocks[0].attn1
    g = torch.Generator().manual_seed(4)
    video, text = (
        torch.randn(2, 40, 32, generator=g, dtype=torch.float64),
        torch.randn(2, 8, 32, generator=g, dtype=torch.float64),
    )
    angles = torch.rand(40, 8, generator=g, dtype=torch.float64) * 6
    rope = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))  # [L, D]
    expected = CogVideoXAttnProcessor2_0()(attn, video, text, image_rotary_emb=rope)
    ctrl = install_attention(model, AttentionConfig(type="full"))
    ctrl.grid = (1, 5, 8)
    out = CogVideoXSelfAttnProcessor(attn.processor.kernel)(attn, video, text, image_rotary_emb=rope)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_joint_vmoba_text_handling():
    """Text queries: dense over all keys. Video queries: all text keys + the selected video blocks, so the
    video rows are an exact softmax merge of [video-only VMoBA] and [dense over text]: their difference
    from the video-only VMoBA output is collinear with (text-only output - video-only output), with a
    coefficient Z_text / (Z_text + Z_video) in (0, 1)."""
    cfg = AttentionConfig(type="vmoba", **TINY_BLOCKS)
    ctrl = AttentionController(cfg)
    ctrl.grid, S, L = (5, 8, 8), 6, 320
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, S + L, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    for layer in range(3):
        out = VMoBAAttention(ctrl, layer)(q, k, v, num_text=S)
        dense = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 4, -1)
        torch.testing.assert_close(
            out[:, :S], torch.einsum("bhqk,bkhd->bqhd", dense, v)[:, :S], rtol=0, atol=1e-12
        )

        video_only = vmoba.vmoba_attention(
            q[:, S:], k[:, S:], v[:, S:], ctrl.grid, cfg.to_vmoba(), layer_idx=layer
        )
        text_only = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q[:, S:], k[:, :S]) / 4, -1)
        text_only = torch.einsum("bhqk,bkhd->bqhd", text_only, v[:, :S])
        delta, direction = out[:, S:] - video_only, text_only - video_only
        alpha = (delta * direction).sum(-1) / (direction * direction).sum(-1)
        torch.testing.assert_close(delta, alpha[..., None] * direction, rtol=0, atol=1e-10)
        assert ((alpha > 0) & (alpha < 1)).all()
        assert 0 < ctrl.stats()[f"density/layer_{layer:02d}"] < 1


def test_grid_gradients_and_stats_with_checkpointing():
    model = _cog()
    ctrl = install_attention(model, AttentionConfig(type="vmoba", **TINY_BLOCKS))
    ctrl.measure_recall = True
    model.enable_gradient_checkpointing()
    inputs = _inputs(shape=(1, 3, 4, 8, 12))
    out = _run(model, inputs)
    assert ctrl.grid == (3, 4, 6) and out.shape == inputs[0].shape
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(model.transformer_blocks[i].attn1.to_q.weight.grad.abs().sum() > 0 for i in range(3))
    assert {f"{n}/layer_{i:02d}" for n in ("density", "recall") for i in range(3)} <= set(ctrl.stats())


def test_keep_attention_reuses_outputs_with_the_same_gradients(attend_calls):
    """enable_checkpointing(keep_attention=True) on CogVideoX (joint text + video attention): the
    recompute reuses the attention outputs (each kernel runs once), and the gradients are plain
    checkpointing's."""
    calls = attend_calls(VMoBAAttention)
    inputs = _inputs(shape=(1, 3, 4, 8, 12))
    grads = []
    for keep in (False, True):
        model = _cog()
        install_attention(model, AttentionConfig(type="vmoba", **TINY_BLOCKS))
        enable_checkpointing(model, keep_attention=keep)
        calls.clear()
        out = _run(model, inputs)
        out.square().mean().backward()
        assert calls == ([0, 1, 2] if keep else [0, 1, 2, 2, 1, 0])
        grads.append({n: p.grad for n, p in model.named_parameters()})
    plain, kept = grads
    for name, g in plain.items():
        assert g is not None, name
        torch.testing.assert_close(kept[name], g, rtol=1e-9, atol=1e-12)


def test_attention_mask_is_refused():
    model = _cog()
    install_attention(model, AttentionConfig(type="full"))
    attn = model.transformer_blocks[0].attn1
    with pytest.raises(ValueError, match="attention_mask"):
        attn.processor(attn, torch.zeros(1, 4, 32), torch.zeros(1, 2, 32), attention_mask=torch.ones(1, 6))
