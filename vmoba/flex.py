"""The `flex` backend: FlexAttention with a BlockMask built straight from the block selection.

The selection is mapped onto 128-token kernel tiles (blocks are padded to whole tiles by the partition):
a (query tile, key tile) pair is *full* when every query of the tile selected the key tile's block and
the key tile holds no padding, *partial* when some query selected it, and skipped otherwise. `mask_mod`
runs on partial tiles only: in block granularity it masks padded keys; in token granularity it reads a
bit-packed per-token table `[B, H, L, ceil(C / 8)]` (uint8), so nothing is L x L and every index stays
well inside int32.

The BlockMask's tile tables come from their own small compiled graph with no sort (a stable partition
by cumsum and scatter; no host sync), and `flex_attention` is compiled separately, once per shape: Dynamo
guards `mask_mod` by its code and lifts the tensors it closes over into graph inputs, so a new selection
never recompiles. Building the mask inside the attention graph, with argsorts, made the first call at
16K-55K tokens compile for minutes on an H100; now it takes seconds (docs/benchmarks.md, notes 4 and 6).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

_RECOMPILE_LIMIT = 64  # compiled variants per function: one per (shape, options); see _compiled_flex
TILE = 128  # BlockMask block size = kernel tile; partitions pad blocks to a multiple of it

# FlexAttention kernel options by CUDA compute capability, for bf16/fp16 and head dims <= 128. Hopper
# (H100/H200): TMA loads, -3% fwd+bwd at 55K tokens (docs/benchmarks.md, note 5). 128x128 forward tiles
# gained another ~1% but overflow shared memory once `mask_mod` reads a table (token granularity).
# Elsewhere FlexAttention's own per-GPU defaults apply.
KERNEL_OPTIONS = {(9, 0): {"USE_TMA": True}}


def default_kernel_options(q: torch.Tensor) -> dict | None:
    """The tuned kernel options for q's GPU, dtype and head dim; None lets FlexAttention choose."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] > 128:
        return None
    return KERNEL_OPTIONS.get(torch.cuda.get_device_capability(q.device))


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., N] -> (counts int32 [...], indices int32 [..., N]): the selected columns first, ascending.

    A stable partition by two cumsums and one scatter, no sort: sorting costs ~10x more at 432 tiles and,
    compiled, generated sort kernels that took minutes to build (docs/benchmarks.md, note 4).
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


_FIELDS = (
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
    """(the BlockMask's tile tables in `_FIELDS` order, the packed per-token selection or None)."""
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


@torch.no_grad()
def block_mask(sel: torch.Tensor, valid: torch.Tensor, block_slots: int) -> BlockMask:
    """The FlexAttention BlockMask (TILE x TILE) of a selection: sel bool [B, H, R, C], valid bool [L]."""
    L = valid.shape[0]
    if sel.is_cuda:
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            tables, bits = _compiled_tables(sel, valid, block_slots)
    else:
        tables, bits = _tables(sel, valid, block_slots)
    if bits is not None:  # token granularity: the packed per-token selection decides inside partial tiles

        def mask_mod(b, h, q_idx, kv_idx):
            c = kv_idx // block_slots
            byte = bits[b, h, q_idx, c // 8].to(torch.int32)
            return ((byte >> (c % 8)) & 1).bool() & valid[kv_idx]

    else:  # block granularity: partial tiles only mask padded keys

        def mask_mod(b, h, q_idx, kv_idx):
            return valid[kv_idx]

    fields = dict(zip(_FIELDS, tables, strict=True))
    return BlockMask(seq_lengths=(L, L), **fields, BLOCK_SIZE=(TILE, TILE), mask_mod=mask_mod)


# Static shapes: each (shape, options) compiles once; Dynamo caches every variant on this one code object,
# so `flex_block_attention` raises the recompile limit (the default 8 would silently fall back to an eager
# path that materialises L x L scores).
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
    if block_slots % TILE or q.shape[1] % block_slots:
        raise ValueError(f"flex needs blocks padded to a multiple of {TILE} slots, got {block_slots}")
    if kernel_options is None:
        kernel_options = default_kernel_options(q)
    mask = block_mask(sel, valid, block_slots)
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        out = _compiled_flex(
            *(t.transpose(1, 2) for t in (q, k, v)), block_mask=mask, kernel_options=kernel_options
        )
    return out.transpose(1, 2)
