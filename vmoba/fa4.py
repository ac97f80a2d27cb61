"""The `fa4` backend: FlashAttention-4's CuTe DSL kernels with per-tile block sparsity (Hopper, Blackwell).

FlashAttention-4 (`pip install flash-attn-4`, package `flash_attn.cute`) runs warp-specialised
TMA/WGMMA kernels on sm90 (FA3's design) and sm100, and skips tiles from the same count/index tables that
`vmoba.tiles` builds for FlexAttention: the key tiles of each query tile (forward, dq) and the query tiles
of each key tile (dk, dv). It reads [B, L, H, D] as is, so there are no transposes either. At 55K tokens
on an H100 its tiles run as fast as cuDNN's dense kernel; FlexAttention's reach ~70% of it
(docs/notes/10-fa4-block-sparse-kernels.md).

Full tiles run unmasked. Partial tiles (padded keys; token granularity's per-query selection) run a CuTe
`mask_mod` that reads `valid` and the bit-packed selection as auxiliary tensors. Block granularity without
padding has no partial tiles, and its kernels are compiled without a mask.

FA4's forward and backward (`flash_attn.cute.interface._flash_attn_fwd` / `_flash_attn_bwd`, the entry
points PyTorch's FlexAttention FLASH backend calls too) run inside `_BlockSparse`, which owns the
raster <-> block order, so the backward can partition again per head group
(`KernelOptions.fa4_backward_head_groups`).
"""

from __future__ import annotations

import functools

import torch

from .partition import SAME_ORDER
from .tiles import FIELDS, TILE, tile_tables

INSTALL_HINT = (
    "the fa4 backend needs FlashAttention-4: pip install flash-attn-4 (or pip install 'vmoba[fa4]')"
)
_ARCHS = (9, 10)  # compute capability majors with FA4 block-sparse forward and backward kernels
_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _api():
    """(flash_attn.cute.interface, BlockSparseTensorsTorch), or None when flash-attn-4 is not importable."""
    try:
        from flash_attn.cute import interface
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    except ImportError:  # not installed; also its CuTe DSL runtime on a machine without a CUDA driver
        return None
    return interface, BlockSparseTensorsTorch


@functools.cache
def _valid_key_mask():
    """CuTe mask_mod for partial tiles in block granularity: a key counts unless it is padding.

    aux_tensors = [valid int32 [L]]. Runs only on partial tiles: those holding padded keys.
    """
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    @cute.jit
    def valid_key(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        valid = aux_tensors[0]
        return scalar_to_ssa(valid[kv_idx[0]], cutlass.Int32) > scalar_to_ssa(0, cutlass.Int32)

    return valid_key


@functools.cache
def _token_mask(block_slots: int):
    """CuTe mask_mod for partial tiles in token granularity: the query selected the key's block.

    aux_tensors = [bits uint8 [B, H, L, ceil(C / 8)] (bit c % 8 of byte c // 8), valid int32 [L]].
    """
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    @cute.jit
    def selected(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        bits, valid = aux_tensors[0], aux_tensors[1]
        c = kv_idx[0] // block_slots
        byte = cutlass.Int32(bits[batch[0], head[0], q_idx[0], c // 8])
        keep = ((byte >> (c % 8)) & 1) * valid[kv_idx[0]]
        return scalar_to_ssa(keep, cutlass.Int32) > scalar_to_ssa(0, cutlass.Int32)

    return selected


def unsupported(q: torch.Tensor) -> str | None:
    """Why `fa4` cannot run on q [B, L, H, D] (None when it can)."""
    if q.dtype not in _DTYPES:
        return f"fa4 needs fp16 or bf16 q, k, v, got {q.dtype}"
    if q.shape[-1] % 16 or q.shape[-1] > 256:
        return f"fa4 needs a head dim that is a multiple of 16 up to 256, got {q.shape[-1]}"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] not in _ARCHS:
        return "fa4 runs on Hopper (sm90) or Blackwell (sm100) GPUs only"
    if _api() is None:
        return INSTALL_HINT
    return None


def fa4_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    block_slots: int,
    valid: torch.Tensor,
    padded: bool = True,
    order=None,
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    backward_head_groups: int | None = None,
) -> torch.Tensor:
    """Block-sparse attention through FlashAttention-4, for tensors `unsupported` accepts.

    Args:
        q, k, v: [B, N, H, D] fp16/bf16, in block order, or in `order`'s raster order when it is given.
        sel: bool [B, H, R, C], R = L (token granularity) or C (block granularity); valid: bool [L]; in block
            order L = C * block_slots, block_slots a multiple of TILE.
        padded: False promises `valid` is all True, so block granularity needs no mask at all.
        order: None, or an object with `to_blocks(x)` ([B, N, h, D] -> [B, L, h, D]) and its inverse
            `from_blocks(y, out=None)`, e.g. `vmoba.partition.BlockOrder`.
        blocks: `order.to_blocks` of q, k, v if already computed (used by the forward only).
        backward_head_groups: what the backward reads (`KernelOptions.fa4_backward_head_groups`): None,
            the saved block order; n, raster tensors partitioned again in n head groups.
    Returns:
        [B, N, H, D] in q's dtype, in q's order.
    """
    if _api() is None:
        raise ImportError(INSTALL_HINT)
    t, bits = tile_tables(sel, valid, block_slots)
    # The mask runs on partial tiles only. Block granularity without padding has none: every selected
    # tile is full, and the kernel is compiled without a mask.
    mask_mod, aux = None, []
    if bits is not None:
        mask_mod, aux = _token_mask(block_slots), [bits, valid.to(torch.int32)]
    elif padded:
        mask_mod, aux = _valid_key_mask(), [valid.to(torch.int32)]
    kernel = _Kernel([t[name] for name in FIELDS], mask_mod, aux)
    return _BlockSparse.apply(q, k, v, kernel, order or SAME_ORDER, blocks, backward_head_groups)


class _Kernel:
    """FA4's forward and backward over one selection's tile tables, for all heads or a slice of them."""

    def __init__(self, tables: list[torch.Tensor], mask_mod, aux: list[torch.Tensor]):
        # `FIELDS` order: (partial counts, indices, full counts, indices) of the key tiles of each query
        # tile (forward, dq), then the same of the query tiles of each key tile (dk, dv); [B, H, ...].
        self.tables, self.mask_mod, self.aux = tables, mask_mod, aux

    def _sparse(self, first: int, heads: slice):
        tables = [x[:, heads].contiguous() for x in self.tables[first : first + 4]]
        return _api()[1](*tables, block_size=(TILE, TILE))

    def _aux(self, heads: slice):
        # Per-head tables (the token bits [B, H, L, C/8]) follow the slice; `valid` [L] has no head dim.
        return [x[:, heads].contiguous() if x.dim() == 4 else x for x in self.aux] or None

    def forward(self, q, k, v):
        """q, k, v [B, L, H, D] block order -> (out [B, L, H, D], lse fp32 [B, H, L])."""
        heads = slice(None)
        out, lse, *_ = _api()[0]._flash_attn_fwd(
            q,
            k,
            v,
            mask_mod=self.mask_mod,
            aux_tensors=self._aux(heads),
            block_sparse_tensors=self._sparse(0, heads),
            return_lse=True,
        )
        return out, lse

    def backward(self, q, k, v, out, grad_out, lse, heads: slice):
        """The heads' (dq, dk, dv), block order [B, L, h, D], of block-order inputs of those heads."""
        return _api()[0]._flash_attn_bwd(
            q,
            k,
            v,
            out,
            grad_out,
            lse[:, heads].contiguous(),
            mask_mod=self.mask_mod,
            aux_tensors=self._aux(heads),
            block_sparse_tensors=self._sparse(4, heads),
        )[:3]


class _BlockSparse(torch.autograd.Function):
    """out = from_blocks(attention(to_blocks(q), to_blocks(k), to_blocks(v))); `groups` (None or n, as
    `KernelOptions.fa4_backward_head_groups`) decides what it saves."""

    @staticmethod
    def forward(ctx, q, k, v, kernel: _Kernel, order, blocks, groups: int | None):
        qb, kb, vb = blocks if blocks is not None else (order.to_blocks(x) for x in (q, k, v))
        out_b, lse = kernel.forward(qb, kb, vb)
        out = order.from_blocks(out_b)
        ctx.groups = groups
        ctx.save_for_backward(*((qb, kb, vb, out_b) if ctx.groups is None else (q, k, v, out)), lse)
        ctx.kernel, ctx.order, ctx.shape = kernel, order, q.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *saved, lse = ctx.saved_tensors  # block order, or raster when the backward partitions again
        order, kernel = ctx.order, ctx.kernel
        if ctx.groups is None:  # one pass over the saved block order (FA4 wants contiguous inputs)
            inputs = [x.contiguous() for x in (*saved, order.to_blocks(grad_out))]
            parts = kernel.backward(*inputs, lse, slice(None))
            return (*(order.from_blocks(part) for part in parts), None, None, None, None)
        grads = [grad_out.new_empty(ctx.shape) for _ in range(3)]
        H = ctx.shape[2]
        size = -(-H // ctx.groups)
        for start in range(0, H, size):
            heads = slice(start, start + size)
            inputs = [order.to_blocks(x[:, :, heads]).contiguous() for x in (*saved, grad_out)]
            parts = kernel.backward(*inputs, lse, heads)
            del inputs
            for grad, part in zip(grads, parts):
                order.from_blocks(part, out=grad[:, :, heads])
        return (*grads, None, None, None, None)
