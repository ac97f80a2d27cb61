"""Tile sparsity tables: a block selection mapped onto 128 x 128 kernel tiles, for the sparse kernels.

Blocks are padded to whole tiles by the partition. A (query tile, key tile) pair is *full* when every
query of the tile selected the key tile's block and the key tile holds no padding, *partial* when some
query selected it (or its keys hold padding), and skipped otherwise. The kernels compute full tiles
unmasked and apply a mask on partial ones: padded keys in block granularity, the bit-packed per-token
selection `[B, H, L, ceil(C / 8)]` (uint8) in token granularity, so nothing is L x L.

The tables come from their own small compiled graph with no sort (a stable partition by cumsum and
scatter) and no host sync; building them inside FlexAttention's graph with argsorts made the first call
at 16K-55K tokens compile for minutes on an H100 (docs/notes/04-compile-time-grows-with-grid.md,
docs/notes/06-mask-tables-without-sort.md).
"""

from __future__ import annotations

import torch

TILE = 128  # kernel tile (BlockMask block size); partitions pad blocks to a multiple of it


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., N] -> (counts int32 [...], indices int32 [..., N]): the selected columns first, ascending.

    A stable partition by two cumsums and one scatter, no sort: sorting costs ~10x more at 432 tiles and,
    compiled, generated sort kernels that took minutes to build
    (docs/notes/04-compile-time-grows-with-grid.md).
    """
    t = tiles.to(torch.int32)
    counts = t.sum(-1, dtype=torch.int32)
    rank = torch.where(
        tiles, t.cumsum(-1, dtype=torch.int32), counts[..., None] + (1 - t).cumsum(-1, dtype=torch.int32)
    )
    columns = torch.arange(tiles.shape[-1], dtype=torch.int32, device=tiles.device).expand_as(rank)
    return counts, torch.empty_like(rank).scatter_(-1, rank.long() - 1, columns)


def _pack_bits(sel: torch.Tensor) -> torch.Tensor:
    """bool [..., C] -> uint8 [..., ceil(C / 8)], bit c % 8 of byte c // 8."""
    C = sel.shape[-1]
    sel = torch.nn.functional.pad(sel, (0, -C % 8)).unflatten(-1, (-1, 8)).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=sel.device)
    return (sel * weights).sum(-1, dtype=torch.uint8)


FIELDS = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)


def _tables(sel: torch.Tensor, valid: torch.Tensor, block_slots: int):
    """(the tile tables in `FIELDS` order, the packed per-token selection or None)."""
    B, H = sel.shape[:2]
    L = valid.shape[0]
    tile_block = torch.arange(L // TILE, device=sel.device) // (block_slots // TILE)  # block of each tile
    clean_tile = valid.view(-1, TILE).all(-1)  # key tile without padding
    live_tile = valid.view(-1, TILE).any(-1)[:, None]  # query tile with a real query; others compute nothing
    bits = None
    if sel.shape[2] == L:  # token granularity: union / intersection over each query tile
        by_tile = sel.view(B, H, L // TILE, TILE, -1)
        some = by_tile.any(3)[..., tile_block]
        every = (by_tile | ~valid.view(1, 1, -1, TILE, 1)).all(3)[..., tile_block]
        full = every & clean_tile
        partial = some & ~full
        bits = _pack_bits(sel)
    else:  # block granularity: every query tile of a block shares the block's selection
        chosen = sel[:, :, tile_block][..., tile_block]
        full = chosen & clean_tile
        partial = chosen & ~clean_tile
    partial, full = partial & live_tile, full & live_tile
    # The kernel reads the key tiles of each query tile (forward, dq) and the query tiles of each key tile
    # (dk, dv): both orders, for partial and full tiles.
    kv, full_kv = _ordered(partial), _ordered(full)
    q, full_q = _ordered(partial.transpose(-1, -2)), _ordered(full.transpose(-1, -2))
    return (*kv, *full_kv, *q, *full_q), bits


# On CUDA the ~40 small ops of the table build run as a few fused kernels (eager, their launches cost
# ~1 ms per call at 55K tokens); it compiles in seconds since `_ordered` has no sort.
_compiled_tables = torch.compile(_tables, dynamic=False, fullgraph=True)
# Compiled variants per compiled function (one per shape; flex also per kernel options): past Dynamo's default
# of 8 it silently falls back to eager, which for FlexAttention materialises L x L scores.
RECOMPILE_LIMIT = 64


@torch.no_grad()
def tile_tables(sel: torch.Tensor, valid: torch.Tensor, block_slots: int):
    """The TILE x TILE sparsity tables of a selection, without host syncs.

    Args:
        sel: bool [B, H, R, C], R = L (token granularity) or C (block granularity); valid: bool [L];
            block_slots: slots per block, a multiple of TILE, L = C * block_slots.
    Returns:
        ({name: int32 table} for the names in `FIELDS`: counts [B, H, L/TILE] and indices
        [B, H, L/TILE, L/TILE] of the partial and full key tiles of each query tile and of the query
        tiles of each key tile; the bit-packed selection uint8 [B, H, L, ceil(C/8)] in token
        granularity, else None).
    """
    if block_slots % TILE or valid.shape[0] % block_slots:
        raise ValueError(f"tile tables need blocks padded to a multiple of {TILE} slots, got {block_slots}")
    if sel.is_cuda:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            tables, bits = _compiled_tables(sel, valid, block_slots)
    else:
        tables, bits = _tables(sel, valid, block_slots)
    return dict(zip(FIELDS, tables, strict=True)), bits
