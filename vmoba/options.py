"""`KernelOptions`: the tuning knobs of the gate and the kernels, one object with the measured defaults.

They change speed and memory, never the result beyond rounding. Pass one to `vmoba_attention(...,
options=KernelOptions(...))` (or `attention_recall`); benchmarks try variants this way, side by side in one
process, instead of overwriting module globals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# (gathered queries per tile, keys per program, num_warps, pipeline stages)
KeyedTile = tuple[int, int, int, int]


@dataclass(frozen=True)
class KernelOptions:
    """Tuning knobs; every default is the measured best (the docs/notes/ file is cited per field)."""

    # Bytes of fp32 gate scores computed at once. Token scores are [B, H, L, C] (1.1 GB at 55K tokens, 432
    # blocks, 12 heads); scopes that never mix heads take them a few heads at a time instead.
    gate_chunk_bytes: int = 1 << 28
    # FlexAttention kernel options. None: vmoba's tuned options for the GPU (`vmoba.flex.KERNEL_OPTIONS`);
    # a mapping: exactly these ({} = FlexAttention's own defaults).
    flex_kernel_options: Mapping[str, Any] | None = None
    # What fa4's backward reads. None: the forward's block-order q, k, v and output, saved (the fastest
    # training step). n: only raster q, k, v and the output are saved, and the backward partitions them
    # again in n head groups, so block-order copies exist for one group at a time: peak memory near dense
    # attention's (1.01x at n = 6 vs 1.85x, 55K tokens on an H100) for ~2 ms more
    # (docs/notes/11-fa4-low-memory-backward.md).
    fa4_backward_head_groups: int | None = None
    # `keyed`'s tiles of forward pass 1 (row max), pass 2 and the backward (docs/notes/17-keyed-row-lists.md).
    keyed_tiles: tuple[KeyedTile, KeyedTile, KeyedTile] = ((128, 128, 4, 3), (64, 128, 4, 1), (64, 128, 8, 3))
    # Bits of a column compacted per step of `keyed`'s row lists (on 2 warps: 0.59 ms at 55K,
    # docs/notes/27-gate-and-list-kernels.md).
    keyed_scan: int = 1024
    # `keyed` on sm_90 (bf16, D = 128): the warp-specialised CUDA kernels (vmoba/_keyed.cu) for forward
    # pass 1 and the backward; False: Triton's everywhere. VMOBA_KEYED_CUDA=0 in the environment overrides
    # True (`vmoba._keyed_cuda.usable`).
    keyed_cuda: bool = True

    def __post_init__(self):
        if self.gate_chunk_bytes < 1:
            raise ValueError(f"gate_chunk_bytes must be >= 1, got {self.gate_chunk_bytes}")
        if self.fa4_backward_head_groups is not None and self.fa4_backward_head_groups < 1:
            raise ValueError(
                f"fa4_backward_head_groups must be None or >= 1, got {self.fa4_backward_head_groups}"
            )
        if len(self.keyed_tiles) != 3 or any(len(tile) != 4 for tile in self.keyed_tiles):
            raise ValueError(
                f"keyed_tiles must be three (queries, keys, warps, stages), got {self.keyed_tiles}"
            )


DEFAULT_OPTIONS = KernelOptions()
