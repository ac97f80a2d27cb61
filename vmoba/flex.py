"""The `flex` backend: FlexAttention with a BlockMask built straight from the block selection.

The BlockMask's tables are `vmoba.tiles`' (128 x 128 tiles, full and partial). `mask_mod` runs on
partial tiles only: in block granularity it masks padded keys; in token granularity it reads the
bit-packed per-token selection, so nothing is L x L and every index stays well inside int32.
`flex_attention` is compiled on its own, once per shape: Dynamo guards `mask_mod` by its code and lifts
the tensors it closes over into graph inputs, so a new selection never recompiles.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .tiles import RECOMPILE_LIMIT, TILE, tile_tables

# FlexAttention kernel options by CUDA compute capability, for bf16/fp16 and head dims <= 128. Hopper
# (H100/H200): TMA loads, -3% fwd+bwd at 55K tokens (docs/notes/05-flex-kernel-options.md). 128x128
# forward tiles gained another ~1% but overflow shared memory once `mask_mod` reads a table (token
# granularity). Elsewhere FlexAttention's own per-GPU defaults apply.
KERNEL_OPTIONS = {(9, 0): {"USE_TMA": True}}


def default_kernel_options(q: torch.Tensor) -> dict | None:
    """The tuned kernel options for q's GPU, dtype and head dim; None lets FlexAttention choose."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] > 128:
        return None
    return KERNEL_OPTIONS.get(torch.cuda.get_device_capability(q.device))


@torch.no_grad()
def block_mask(sel: torch.Tensor, valid: torch.Tensor, block_slots: int) -> BlockMask:
    """The FlexAttention BlockMask (TILE x TILE) of a selection: sel bool [B, H, R, C], valid bool [L]."""
    L = valid.shape[0]
    tables, bits = tile_tables(sel, valid, block_slots)
    if bits is not None:  # token granularity: the packed per-token selection decides inside partial tiles

        def mask_mod(b, h, q_idx, kv_idx):
            c = kv_idx // block_slots
            byte = bits[b, h, q_idx, c // 8].to(torch.int32)
            return ((byte >> (c % 8)) & 1).bool() & valid[kv_idx]

    else:  # block granularity: partial tiles only mask padded keys

        def mask_mod(b, h, q_idx, kv_idx):
            return valid[kv_idx]

    return BlockMask(seq_lengths=(L, L), **tables, BLOCK_SIZE=(TILE, TILE), mask_mod=mask_mod)


# Static shapes: each (shape, options) compiles once; Dynamo caches every variant on this one code object,
# so `flex_block_attention` raises the recompile limit (RECOMPILE_LIMIT).
_compiled_flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)


def flex_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    block_slots: int,
    valid: torch.Tensor,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Block-sparse attention through FlexAttention.

    Args:
        q, k, v: [B, L, H, D] in block order; L = C * block_slots, block_slots a multiple of TILE (128).
        sel: bool [B, H, R, C], R = L (token granularity) or C (block granularity); valid: bool [L].
        kernel_options: FlexAttention kernel options (default: `default_kernel_options(q)`).
    Returns:
        [B, L, H, D] in q's dtype.
    """
    if kernel_options is None:
        kernel_options = default_kernel_options(q)
    mask = block_mask(sel, valid, block_slots)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        out = _compiled_flex(
            *(t.transpose(1, 2) for t in (q, k, v)), block_mask=mask, kernel_options=kernel_options
        )
    return out.transpose(1, 2)
