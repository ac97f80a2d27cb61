"""1D/2D/3D block partition: reorder raster tokens so every block is contiguous, and back.

Every partition is a space-time cube `(ct, ch, cw)` in disguise: 1D is `(ct, H, W)`, 2D is `(T, ch, cw)`.
Grids that do not divide by the cube use **padded blocks**: the grid is zero-padded up to whole cubes, so
every block has the same volume `ct*ch*cw` and the padding sits at the grid positions past the edge; a
`pad_to` multiple may further round each block's volume up (padding appended at the block's end) so
blocks align with kernel tiles. `valid_mask` marks real tokens: padded keys must be masked and padded
queries dropped (`unpartition` drops them).

`BlockOrder` is one call's order: an optional prefix (e.g. text tokens, padded to whole blocks) in front of
the video's blocks, with `to_blocks` / `from_blocks` the way there and back.

On CUDA, outside autograd, both directions run as one Triton row gather through a cached slot index
(`vmoba.gather`, ~3x faster than the strided copy); elsewhere they are reshape/permute copies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import gather
from .config import PARTITION_KINDS


@dataclass(frozen=True)
class BlockLayout:
    """Geometry of one partition of a `(T, H, W)` grid into `num_blocks` blocks of `padded_volume` slots."""

    grid: tuple[int, int, int]
    cube: tuple[int, int, int]  # (ct, ch, cw) tokens per block along (t, h, w)
    counts: tuple[int, int, int]  # blocks along (t, h, w)
    padded_volume: int  # slots per block: ct*ch*cw rounded up to pad_to

    @property
    def volume(self) -> int:
        return self.cube[0] * self.cube[1] * self.cube[2]

    @property
    def num_blocks(self) -> int:
        return self.counts[0] * self.counts[1] * self.counts[2]

    @property
    def length(self) -> int:
        """Tokens in block order, padding included: `num_blocks * padded_volume`."""
        return self.num_blocks * self.padded_volume

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _check_grid(grid) -> tuple[int, int, int]:
    try:
        grid = tuple(int(g) for g in grid)
    except TypeError:
        raise ValueError(f"grid must be (T, H, W), got {grid!r}") from None
    if len(grid) != 3 or min(grid) <= 0:
        raise ValueError(f"grid must be (T, H, W) of positive ints, got {grid!r}")
    return grid


def block_layout(grid, kind: str, block, pad_to: int = 1) -> BlockLayout:
    """The layout of partition `kind` ("1d" | "2d" | "3d") with `block` (int frames | (h, w) | (t, h, w)).

    Raises ValueError when a block size is <= 0 or larger than the grid, or `kind` is unknown.
    """
    T, H, W = _check_grid(grid)
    if kind not in PARTITION_KINDS:
        raise ValueError(f"kind must be one of {PARTITION_KINDS}, got {kind!r}")
    sizes = (block,) if isinstance(block, int) else tuple(block)
    expected = {"1d": 1, "2d": 2, "3d": 3}[kind]
    if len(sizes) != expected:
        raise ValueError(f"block for a {kind} partition must have {expected} int(s), got {block!r}")
    cube = {"1d": (sizes[0], H, W), "2d": (T, *sizes), "3d": sizes}[kind]
    if any(int(c) <= 0 or int(c) > g for c, g in zip(cube, (T, H, W))):
        raise ValueError(
            f"block {block!r} of a {kind} partition must be > 0 and at most the grid {(T, H, W)} per dim"
        )
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    cube = tuple(int(c) for c in cube)
    counts = tuple(-(-g // c) for g, c in zip((T, H, W), cube))
    volume = cube[0] * cube[1] * cube[2]
    return BlockLayout((T, H, W), cube, counts, -(-volume // pad_to) * pad_to)


def partition_layout(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """[B, L, *rest] raster tokens -> [B, num_blocks * padded_volume, *rest] in block order (zero padding)."""
    if gather.usable(x):
        out = x.new_empty(x.shape[0], layout.length, *x.shape[2:])
        return gather.gather_rows(x, slot_sources(layout, x.device), out)
    (T, H, W), (ct, ch, cw), (nt, nh, nw) = layout.grid, layout.cube, layout.counts
    B, rest = x.shape[0], x.shape[2:]
    x = x.reshape(B, T, H, W, *rest)
    if (nt * ct, nh * ch, nw * cw) != (T, H, W):
        padded = x.new_zeros(B, nt * ct, nh * ch, nw * cw, *rest)
        padded[:, :T, :H, :W] = x
        x = padded
    tail = tuple(range(7, 7 + len(rest)))
    x = x.reshape(B, nt, ct, nh, ch, nw, cw, *rest).permute(0, 1, 3, 5, 2, 4, 6, *tail)
    x = x.reshape(B, layout.num_blocks, layout.volume, *rest)
    if layout.padded_volume != layout.volume:
        pad = x.new_zeros(B, layout.num_blocks, layout.padded_volume - layout.volume, *rest)
        x = torch.cat([x, pad], dim=2)
    return x.reshape(B, layout.length, *rest)


def unpartition_layout(x: torch.Tensor, layout: BlockLayout, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `partition_layout`: [B, num_blocks * padded_volume, *rest] -> [B, L, *rest] raster order.

    With `out` ([B, L, *rest], e.g. a head slice of a larger tensor), writes there and returns it; on CUDA
    that is the row gather itself, with no temporary.
    """
    if gather.usable(x) and (out is None or (out.dtype == x.dtype and gather.usable(out))):
        out = x.new_empty(x.shape[0], layout.num_tokens, *x.shape[2:]) if out is None else out
        return gather.gather_rows(x, token_slots(layout, x.device), out)
    (T, H, W), (ct, ch, cw), (nt, nh, nw) = layout.grid, layout.cube, layout.counts
    B, rest = x.shape[0], x.shape[2:]
    tail = tuple(range(7, 7 + len(rest)))
    x = x.reshape(B, layout.num_blocks, layout.padded_volume, *rest)[:, :, : layout.volume]
    x = x.reshape(B, nt, nh, nw, ct, ch, cw, *rest).permute(0, 1, 4, 2, 5, 3, 6, *tail)
    x = x.reshape(B, nt * ct, nh * ch, nw * cw, *rest)[:, :T, :H, :W].reshape(B, T * H * W, *rest)
    return x if out is None else out.copy_(x)


@dataclass(frozen=True)
class BlockOrder:
    """Raster order <-> block order of one call: `num_prefix` tokens (zero-padded to whole blocks, the first
    `head` slots), then the video's blocks (`partition_layout`)."""

    layout: BlockLayout
    num_prefix: int

    @property
    def head(self) -> int:
        """Slots before the video's blocks: the prefix rounded up to whole blocks."""
        return -(-self.num_prefix // self.layout.padded_volume) * self.layout.padded_volume

    @property
    def padded(self) -> bool:
        """Whether the block order holds padding slots (grid edges, block rounding or the prefix's block)."""
        return self.layout.length != self.layout.num_tokens or self.head != self.num_prefix

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S + L, ...] raster -> [B, head + C*V, ...] block order."""
        S = self.num_prefix
        video = partition_layout(x[:, S:], self.layout)
        if not S:
            return video
        pad = (0, 0) * (x.dim() - 2) + (0, self.head - S)
        return torch.cat([torch.nn.functional.pad(x[:, :S], pad), video], dim=1)

    def from_blocks(self, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of `to_blocks`: [B, head + C*V, ...] -> [B, S + L, ...] (padding dropped); with `out`
        (e.g. a head slice of a larger tensor), written there (see `unpartition_layout`)."""
        if out is not None:
            out[:, : self.num_prefix] = y[:, : self.num_prefix]
            unpartition_layout(y[:, self.head :], self.layout, out[:, self.num_prefix :])
            return out
        video = unpartition_layout(y[:, self.head :], self.layout)
        if not self.num_prefix:
            return video  # no concatenation (a full copy) without a prefix
        return torch.cat([y[:, : self.num_prefix], video], dim=1)


class _SameOrder:
    """The order of kernels' `order` argument when their inputs are already in block order: no-op
    `to_blocks` / `from_blocks` (the interface of `BlockOrder`)."""

    @staticmethod
    def to_blocks(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def from_blocks(y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return y if out is None else out.copy_(y)


SAME_ORDER = _SameOrder()


def partition(x: torch.Tensor, grid, kind: str, block, pad_to: int = 1) -> torch.Tensor:
    """Reorder tokens so every `kind` block is contiguous (padded blocks, see the module docstring).

    Args:
        x: [B, L, ...] tokens in raster order `(t, h, w)` of `grid`, `L == T*H*W`.
        grid: (T, H, W).
        kind: "1d" | "2d" | "3d"; block: frames (1d), (h, w) (2d) or (t, h, w) (3d).
        pad_to: round each block's slot count up to a multiple of this (kernel tile alignment).
    Returns:
        [B, C * V, ...] with C blocks of V slots each; padded slots hold zeros.
    """
    layout = block_layout(grid, kind, block, pad_to)
    if x.dim() < 2 or x.shape[1] != layout.num_tokens:
        raise ValueError(
            f"x must be [B, L, ...] with L == T*H*W == {layout.num_tokens}, got {tuple(x.shape)}"
        )
    return partition_layout(x, layout)


def unpartition(x: torch.Tensor, grid, kind: str, block, pad_to: int = 1) -> torch.Tensor:
    """Inverse of `partition` with the same arguments: [B, C * V, ...] -> [B, L, ...] raster order."""
    layout = block_layout(grid, kind, block, pad_to)
    if x.dim() < 2 or x.shape[1] != layout.length:
        raise ValueError(f"x must be [B, C*V, ...] with C*V == {layout.length}, got {tuple(x.shape)}")
    return unpartition_layout(x, layout)


# The permutation itself, cached per layout and device: the row gather's indices, and what `valid_mask`
# and `attention_recall` derive from it. Built on the CPU (integer tensors take the strided copy).
@functools.lru_cache(maxsize=64)
def slot_sources(layout: BlockLayout, device: torch.device) -> torch.Tensor:
    """int32 [C * V]: the raster token each block-order slot holds, -1 at padding."""
    tokens = torch.arange(1, layout.num_tokens + 1, dtype=torch.int32)[None]
    return (partition_layout(tokens, layout)[0] - 1).to(device)


@functools.lru_cache(maxsize=64)
def token_slots(layout: BlockLayout, device: torch.device) -> torch.Tensor:
    """int32 [L]: the block-order slot of each raster token."""
    slots = torch.arange(layout.length, dtype=torch.int32)[None]
    return unpartition_layout(slots, layout)[0].to(device)


@functools.lru_cache(maxsize=64)
def valid_mask(layout: BlockLayout, device: torch.device) -> torch.Tensor:
    """bool [C * V]: which block-order slots hold real tokens (cached per layout and device)."""
    return slot_sources(layout, device) >= 0
