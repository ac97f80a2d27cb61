"""VMoBA: Video Mixture-of-Block Attention (standalone; imports only torch).

Public API: `VMoBAConfig`, `vmoba_attention`, `dense_attention`, `attention_recall`, `select_blocks`, `partition`,
`unpartition`, `selection_stats`. See docs/vmoba.md.
"""

from .attention import BACKENDS, attention_recall, dense_attention, selection_stats, vmoba_attention
from .config import VMoBAConfig
from .partition import block_layout, partition, unpartition
from .selection import select_blocks

__all__ = [
    "BACKENDS",
    "VMoBAConfig",
    "attention_recall",
    "block_layout",
    "dense_attention",
    "partition",
    "select_blocks",
    "selection_stats",
    "unpartition",
    "vmoba_attention",
]
