"""Wan's transformer block with its fp32 elementwise work fused into one kernel per step (CUDA).

Around its three sub-layers, diffusers' `WanTransformerBlock.forward` runs Wan's adaptive layer norms and
gated residuals as chains of fp32 elementwise ops: upcast, layer norm, `* (1 + scale) + shift`, downcast;
upcast, `+ out * gate`, downcast. Eagerly each op is a kernel reading and writing [B, L, C] in fp32 (340 MB
per tensor at 55K tokens and width 1536), forward, checkpoint recompute and backward, in every layer.
`fuse_wan_blocks` swaps each block's class for one whose forward does the same math through three small
functions that Inductor compiles into one kernel each way (docs/notes/23-fused-wan-elementwise.md). The
whole block is not compiled: PyTorch mis-shapes the gradient of the broadcast modulation table there
(docs/notes/15-regional-compilation.md).
On the CPU the functions run eagerly, so the block is bitwise the diffusers one.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import nn


def _rows(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A modulation flattened to 1-D ([B * C] or [B * L * C]) back to [B, 1 or L, C], to broadcast with x."""
    return m.view(x.shape[0], -1, x.shape[-1])


def _modulated_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan's adaptive layer norm: x [B, L, C], scale/shift fp32 [B * C] or [B * L * C] -> [B, L, C] in x's
    dtype."""
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (normed * (1 + _rows(scale, x)) + _rows(shift, x)).type_as(x)


def _affine_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """diffusers' `FP32LayerNorm` with weights: x [B, L, C] -> [B, L, C] in x's dtype."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).type_as(x)


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate in fp32: x, y [B, L, C], gate fp32 [B * C] or [B * L * C] -> [B, L, C] in x's dtype."""
    return (x.float() + y.float() * _rows(gate, x)).type_as(x)


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


def fused_on_cuda(fn, x: torch.Tensor):
    """`fn` compiled by Inductor (one fused kernel each way) when x is a CUDA tensor, else `fn` itself: the
    CPU needs no compiler toolchain and is not a hot path."""
    return _compiled(fn) if x.is_cuda else fn


# The modulations enter the compiled functions flattened: as [1, 1, C] (batch 1) Inductor's backward
# gives them a [C] gradient, which autograd rejects (pytorch/pytorch#178080, the error of
# docs/notes/15-regional-compilation.md again).
def modulated_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """`layer_norm(x) * (1 + scale) + shift` in fp32, fused: x [B, L, C]; scale, shift fp32 [B, 1 or L, C]."""
    return fused_on_cuda(_modulated_norm, x)(x, scale.flatten(), shift.flatten(), eps)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`x + y * gate` in fp32, fused: x, y [B, L, C]; gate fp32 [B, 1 or L, C]."""
    return fused_on_cuda(_gated_residual, x)(x, y, gate.flatten())


def affine_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """diffusers' `FP32LayerNorm` with weights, fused: x [B, L, C] -> [B, L, C] in x's dtype."""
    return fused_on_cuda(_affine_norm, x)(x, norm.weight, norm.bias, norm.eps)


class FusedWanTransformerBlock(WanTransformerBlock):
    """`WanTransformerBlock` (same parameters, same math) with the elementwise chains fused on CUDA."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: torch.Tensor,
    ) -> torch.Tensor:
        """hidden_states [B, L, C]; temb [B, 6, C] (Wan 2.1) or [B, L, 6, C] (Wan 2.2 TI2V) -> [B, L, C]."""
        x = hidden_states
        if temb.ndim == 4:  # per-token modulation: [B, L, 6, C] -> six [B, L, C]
            mods = (self.scale_shift_table.unsqueeze(0) + temb.float()).unbind(2)
        else:  # [B, 6, C] -> six [B, 1, C]
            mods = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
        shift, scale, gate, c_shift, c_scale, c_gate = mods

        # 1. Self-attention
        out = self.attn1(modulated_norm(x, scale, shift, self.norm1.eps), None, None, rotary_emb)
        x = gated_residual(x, out, gate)
        # 2. Cross-attention (norm2 is an affine layer norm or, without cross_attn_norm, the identity)
        normed = x if isinstance(self.norm2, nn.Identity) else affine_norm(x, self.norm2)
        x = x + self.attn2(normed, encoder_hidden_states, None, None)
        # 3. Feed-forward
        out = self.ffn(modulated_norm(x, c_scale, c_shift, self.norm3.eps))
        return gated_residual(x, out, c_gate)


def fuse_wan_blocks(model: nn.Module, fused: bool = True) -> int:
    """Swap every `WanTransformerBlock` in `model` (a `WanTransformer3DModel`, or a block itself) for
    `FusedWanTransformerBlock` in place, or back with `fused=False` (weights, state dict and checkpoints
    are unchanged either way); returns how many blocks were swapped."""
    source, target = (WanTransformerBlock, FusedWanTransformerBlock)[:: 1 if fused else -1]
    swapped = 0
    for block in model.modules():
        if type(block) is source:
            block.__class__ = target
            swapped += 1
    return swapped
