"""VMoBA: Video Mixture-of-Block Attention (standalone; imports only torch).

Public API: `VMoBAConfig`, `vmoba_attention`, `dense_attention`, `attention_recall`, `select_blocks`, `partition`,
`unpartition`, `selection_stats`; `KernelOptions` (tuning knobs); the backend registry (`BACKENDS`, `Backend`,
`register`, `unregister`). See docs/vmoba.md.
"""

from .attention import attention_recall, dense_attention, selection_stats, vmoba_attention
from .backends import BACKENDS, Backend, register, unregister
from .config import VMoBAConfig
from .options import KernelOptions
from .partition import block_layout, partition, unpartition
from .selection import select_blocks

__all__ = [
    "BACKENDS",
    "Backend",
    "KernelOptions",
    "VMoBAConfig",
    "attention_recall",
    "block_layout",
    "dense_attention",
    "partition",
    "register",
    "select_blocks",
    "selection_stats",
    "unpartition",
    "unregister",
    "vmoba_attention",
]
