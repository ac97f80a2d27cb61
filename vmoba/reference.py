"""The `reference` backend: dense attention under the token mask, in (at least) fp32. The oracle."""

from __future__ import annotations

import torch


def token_mask(sel: torch.Tensor, block_size: int, valid: torch.Tensor) -> torch.Tensor:
    """The token-level mask of a block selection.

    Args:
        sel: bool [B, H, R, C]; R = C*S query rows (token granularity) or C query blocks (block granularity).
        block_size: S, slots per block; valid: bool [C*S], False at padded slots.
    Returns:
        bool [B, H, C*S, C*S]: query slot i may attend key slot j.
    """
    L = valid.shape[0]
    rows = sel if sel.shape[2] == L else sel.repeat_interleave(block_size, dim=2)
    key_block = torch.arange(L, device=sel.device) // block_size
    return rows[..., key_block] & valid


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor, block_size: int, valid: torch.Tensor
) -> torch.Tensor:
    """Softmax attention of every query over its selected blocks' valid keys, scale 1/sqrt(D).

    Args:
        q, k, v: [B, L, H, D] in block order (L = C*S slots); sel, block_size, valid: as in `token_mask`.
    Returns:
        [B, L, H, D] in q's dtype, computed in fp32 (or fp64 for fp64 inputs).
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    mask = token_mask(sel, block_size, valid)
    with torch.autocast(q.device.type, enabled=False):  # the oracle stays in fp32 under autocast too
        scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) * q.shape[-1] ** -0.5
        probs = scores.masked_fill(~mask, -torch.inf).softmax(-1)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v.to(dtype)).to(q.dtype)
