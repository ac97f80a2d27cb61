"""Model-side kernels on a GPU: the fused (compiled) Wan RoPE and Wan block against float64 references."""

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from models import wan_block
from models.attention import FullAttention, VMoBAAttention, install_attention
from models.checkpointing import enable_checkpointing
from models.config import AttentionConfig
from models.families.wan import _wan_rope, wan_rope
from models.wan_block import fuse_wan_blocks

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("length", [4096, 9000])  # two lengths: the second compile is shape-dynamic
def test_fused_wan_rope_matches_float64_forward_and_backward(length):
    x = torch.randn(2, length, 12, 128, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(1, length, 1, 64, device="cuda") * 100  # Wan's angles reach ~100 rad
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    grad_out = torch.randn_like(x)

    def fwd_bwd(fn, dtype):
        leaf = x.to(dtype).requires_grad_()
        out = fn(leaf, cos.to(dtype), sin.to(dtype))
        return out, torch.autograd.grad(out, leaf, grad_out.to(dtype))[0]

    ref = fwd_bwd(_wan_rope, torch.float64)
    fused = fwd_bwd(wan_rope, torch.bfloat16)
    eager = fwd_bwd(_wan_rope, torch.bfloat16)
    for got, base, want in zip(fused, eager, ref):
        assert got.dtype == torch.bfloat16
        err, base_err = ((t.double() - want).abs().max().item() for t in (got, base))
        # bf16 rounding of the output is the only error source: the fused kernel is as accurate as eager.
        assert err <= 2 * base_err + 1e-3, (err, base_err)
        assert err < 0.05 * want.abs().max().item()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("per_token_temb", [False, True])
def test_fused_wan_block_matches_float64_forward_and_backward(per_token_temb, batch):
    """The fused block (forward and backward, the modulation table's gradient included) is as accurate as
    diffusers' eager block, both measured against the block in float64. At these small sizes Inductor's
    shape bug does not show; the next test catches it."""
    B, L, C = batch, 1000, 256
    plain = WanTransformerBlock(C, 512, 2, cross_attn_norm=True).cuda()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = copy.deepcopy(plain)
    assert fuse_wan_blocks(fused) == 1
    x, context, weight = (
        torch.randn(B, L, C, device="cuda"),
        torch.randn(B, 7, C, device="cuda"),
        torch.randn(B, L, C, device="cuda"),
    )
    temb = torch.randn(B, L, 6, C, device="cuda") if per_token_temb else torch.randn(B, 6, C, device="cuda")

    def fwd_bwd(block, dtype):
        block = copy.deepcopy(block).to(dtype)
        leaves = [t.to(dtype).requires_grad_() for t in (x, context)]
        out = block(*leaves, temb.to(dtype), None)
        grads = torch.autograd.grad(
            (out * weight.to(dtype)).sum(), [*leaves, block.scale_shift_table, block.norm2.weight]
        )
        return out, *grads

    ref = fwd_bwd(plain, torch.float64)
    for got, base, want in zip(fwd_bwd(fused, torch.bfloat16), fwd_bwd(plain, torch.bfloat16), ref):
        assert got.shape == want.shape
        err, base_err = ((t.double() - want).abs().max().item() for t in (got, base))
        assert err <= 2 * base_err + 1e-3 * want.abs().max().item(), (err, base_err)


@pytest.mark.parametrize("batch, length", [(1, 55296), (2, 3000)])  # (1, 55296): bench_train's shapes
def test_fused_wan_chains_match_float64_at_training_shapes(batch, length):
    """The three compiled chains, forward and backward, at the shapes where Inductor's backward
    mis-shaped the [1, 1, C] modulation's gradient (a split reduction over 55K rows; pytorch#178080)."""
    C, eps = 1536, 1e-6
    x, y, weight = (torch.randn(batch, length, C, device="cuda") for _ in range(3))
    table, temb = torch.randn(1, 6, C, device="cuda") / C**0.5, torch.randn(batch, 6, C, device="cuda")
    norm = torch.nn.LayerNorm(C, device="cuda")
    with torch.no_grad():
        for param in norm.parameters():
            param.add_(torch.randn_like(param) * 0.1)

    def fwd_bwd(dtype, fused):
        xl, yl, tl = (t.to(dtype).requires_grad_() for t in (x, y, table))
        ln = copy.deepcopy(norm).to(dtype)
        shift, scale, gate = (tl + temb.to(torch.promote_types(dtype, torch.float32))).chunk(6, dim=1)[:3]
        if fused:
            outs = (
                wan_block.modulated_norm(xl, scale, shift, eps),
                wan_block.gated_residual(xl, yl, gate),
                wan_block.affine_norm(xl, ln),
            )
        else:  # the eager functions diffusers' ops amount to
            outs = (
                wan_block._modulated_norm(xl, scale.flatten(), shift.flatten(), eps),
                wan_block._gated_residual(xl, yl, gate.flatten()),
                wan_block._affine_norm(xl, ln.weight, ln.bias, eps),
            )
        loss = sum((o.double() * weight.double()).sum() for o in outs)
        return *outs, *torch.autograd.grad(loss, [xl, yl, tl, ln.weight, ln.bias])

    ref = fwd_bwd(torch.float64, fused=False)
    for got, base, want in zip(fwd_bwd(torch.bfloat16, True), fwd_bwd(torch.bfloat16, False), ref):
        assert got.shape == want.shape and got.dtype == base.dtype
        err, base_err = ((t.double() - want).abs().max().item() for t in (got, base))
        assert err <= 2 * base_err + 1e-3 * want.abs().max().item(), (err, base_err)


@pytest.mark.parametrize("attention", ["token", "block", "full"])
def test_keep_attention_gives_plain_checkpointings_gradients_on_gpu(attention, attend_calls):
    """`enable_checkpointing(keep_attention=True)` with the GPU kernels (token: `keyed`, on Hopper its CUDA
    kernels; block: `backend=auto`; full: cuDNN SDPA): each kernel runs once per block, and the bf16
    gradients match plain checkpointing's up to bf16 rounding of sums the kernels (cuDNN's and `keyed`'s
    atomic adds, in every attention) take in a different order each run: compared as one vector, since
    some parameters' gradients are that rounding alone (a key bias's is 0 in exact arithmetic)."""
    if attention == "full":
        cfg, kernel = AttentionConfig(type="full"), FullAttention
    else:  # vmoba_wan2.1's blocks on an 8x16x16 grid: 4, 8 and 16 blocks, about a quarter picked
        blocks = dict(block_1d=2, block_2d=(4, 8), block_3d=(4, 4, 8), topk_1d=1, topk_2d=2, topk_3d=4)
        cfg, kernel = AttentionConfig(type="vmoba", granularity=attention, **blocks), VMoBAAttention
    calls = attend_calls(kernel)
    latents = torch.randn(1, 4, 8, 32, 32, device="cuda", dtype=torch.bfloat16)
    t = torch.rand(1, device="cuda") * 1000
    text = torch.randn(1, 7, 32, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(1, 4, 8, 32, 32, device="cuda")
    grads = []
    for keep in (False, True):
        torch.manual_seed(0)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=256, num_layers=3, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        ).to("cuda", torch.bfloat16)  # fmt: skip
        fuse_wan_blocks(model)
        install_attention(model, cfg)
        enable_checkpointing(model, keep_attention=keep)
        calls.clear()
        out = model(latents, t, text).sample
        (out.float() * weight).sum().backward()
        assert calls == ([0, 1, 2] if keep else [0, 1, 2, 2, 1, 0])
        assert all(p.grad is not None for p in model.parameters())
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters()]))
    plain, kept = grads
    assert (kept - plain).norm() <= 0.01 * plain.norm()
