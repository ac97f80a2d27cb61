"""The `flex` backend: FlexAttention with a BlockMask built straight from the block selection.

The selection is mapped onto 128-token kernel tiles (blocks are padded to whole tiles by the partition):
a (query tile, key tile) pair is *full* when every query of the tile selected the key tile's block and
the key tile holds no padding, *partial* when some query selected it, and skipped otherwise. `mask_mod`
runs on partial tiles only: in block granularity it masks padded keys; in token granularity it reads a
bit-packed per-token table `[B, H, L, ceil(C / 8)]` (uint8), so nothing is L x L and every index stays
well inside int32. Mask build and attention run in one compiled graph per shape, with the selection as a
plain tensor input: a new selection never recompiles and never syncs with the host.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

TILE = 128  # BlockMask block size = kernel tile; partitions pad blocks to a multiple of it

# Tuned on an H100 for D = 128, bf16 (docs/benchmarks.md); None lets FlexAttention choose.
CUDA_KERNEL_OPTIONS: dict | None = None


def _tile_indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, H, Qt, Kt] -> (counts int32 [B, H, Qt], key tile indices int32 [B, H, Qt, Kt], selected first)."""
    counts = tiles.sum(-1, dtype=torch.int32)
    order = tiles.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
    return counts, order.to(torch.int32)


def _pack_bits(sel: torch.Tensor) -> torch.Tensor:
    """bool [..., C] -> uint8 [..., ceil(C / 8)], bit c % 8 of byte c // 8."""
    C = sel.shape[-1]
    sel = torch.nn.functional.pad(sel, (0, -C % 8)).unflatten(-1, (-1, 8)).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=sel.device)
    return (sel * weights).sum(-1, dtype=torch.uint8)


def block_mask(sel: torch.Tensor, valid: torch.Tensor, block_slots: int) -> BlockMask:
    """The FlexAttention BlockMask (TILE x TILE) of a selection: sel bool [B, H, R, C], valid bool [L]."""
    B, H = sel.shape[:2]
    L = valid.shape[0]
    per_block = block_slots // TILE
    tile_block = torch.arange(L // TILE, device=sel.device) // per_block  # block of each tile
    clean_tile = valid.view(-1, TILE).all(-1)  # key tile without padding
    live_tile = valid.view(-1, TILE).any(-1)[:, None]  # query tile with a real query; others compute nothing
    if sel.shape[2] == L:  # token granularity: union / intersection over each query tile
        by_tile = sel.view(B, H, L // TILE, TILE, -1)
        some = by_tile.any(3)[..., tile_block]
        every = (by_tile | ~valid.view(1, 1, -1, TILE, 1)).all(3)[..., tile_block]
        full = every & clean_tile
        partial = some & ~full
        bits = _pack_bits(sel)

        def mask_mod(b, h, q_idx, kv_idx):
            c = kv_idx // block_slots
            byte = bits[b, h, q_idx, c // 8].to(torch.int32)
            return ((byte >> (c % 8)) & 1).bool() & valid[kv_idx]

    else:  # block granularity: every query tile of a block shares the block's selection
        chosen = sel[:, :, tile_block][..., tile_block]
        full = chosen & clean_tile
        partial = chosen & ~clean_tile

        def mask_mod(b, h, q_idx, kv_idx):
            return valid[kv_idx]

    partial, full = partial & live_tile, full & live_tile
    return BlockMask.from_kv_blocks(
        *_tile_indices(partial), *_tile_indices(full), BLOCK_SIZE=TILE, mask_mod=mask_mod, seq_lengths=(L, L)
    )


def _flex_blocks(q, k, v, sel, valid, block_slots: int, kernel_options):
    """Block mask build + FlexAttention: q, k, v [B, H, L, D], sel bool [B, H, R, C], valid bool [L]."""
    mask = block_mask(sel, valid, block_slots)
    return flex_attention(q, k, v, block_mask=mask, kernel_options=kernel_options)


# Static shapes: each (shape, granularity, options) compiles once; Dynamo caches every variant on this one
# code object, so `flex_block_attention` raises the recompile limit (the default 8 would silently fall
# back to an eager path that materialises L x L scores).
_compiled_flex = torch.compile(_flex_blocks, dynamic=False, fullgraph=True)
_RECOMPILE_LIMIT = 64


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
        kernel_options: FlexAttention kernel options (default: CUDA_KERNEL_OPTIONS on CUDA).
    Returns:
        [B, L, H, D] in q's dtype.
    """
    if block_slots % TILE or q.shape[1] % block_slots:
        raise ValueError(f"flex needs blocks padded to a multiple of {TILE} slots, got {block_slots}")
    if kernel_options is None and q.is_cuda:
        kernel_options = CUDA_KERNEL_OPTIONS
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        out = _compiled_flex(*(t.transpose(1, 2) for t in (q, k, v)), sel, valid, block_slots, kernel_options)
    return out.transpose(1, 2)
