"""The `fa4` backend: FlashAttention-4's CuTe DSL kernels with per-tile block sparsity (Hopper, Blackwell).

FlashAttention-4 (`pip install flash-attn-4`, package `flash_attn.cute`) runs warp-specialised
TMA/WGMMA kernels on sm90 (FA3's design) and sm100, and skips tiles from the same count/index tables that
`vmoba.tiles` builds for FlexAttention: the key tiles of each query tile (forward, dq) and the query tiles
of each key tile (dk, dv). It reads [B, L, H, D] as is, so there are no transposes either. At 55K tokens
on an H100 its tiles run as fast as cuDNN's dense kernel; FlexAttention's reach ~70% of it
(docs/benchmarks.md, note 10).

Full tiles run unmasked. Partial tiles (padded keys; token granularity's per-query selection) run a CuTe
`mask_mod` that reads `valid` and the bit-packed selection as auxiliary tensors. Block granularity without
padding has no partial tiles, and its kernels are compiled without a mask.
"""

from __future__ import annotations

import functools

import torch

from .tiles import FIELDS, TILE, tile_tables

INSTALL_HINT = (
    "the fa4 backend needs FlashAttention-4: pip install flash-attn-4 (or pip install 'vmoba[fa4]')"
)
_ARCHS = (9, 10)  # compute capability majors with FA4 block-sparse forward and backward kernels
_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _api():
    """(flash_attn_func, BlockSparseTensorsTorch), or None when flash-attn-4 is not importable."""
    try:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    except ImportError:  # not installed; also its CuTe DSL runtime on a machine without a CUDA driver
        return None
    return flash_attn_func, BlockSparseTensorsTorch


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
) -> torch.Tensor:
    """Block-sparse attention through FlashAttention-4, for calls `unsupported` accepts.

    Args:
        q, k, v: [B, L, H, D] fp16/bf16 in block order, L = C * block_slots, block_slots a multiple of TILE.
        sel: bool [B, H, R, C], R = L (token granularity) or C (block granularity); valid: bool [L].
        padded: False promises `valid` is all True, so block granularity needs no mask at all.
    Returns:
        [B, L, H, D] in q's dtype.
    """
    api = _api()
    if api is None:
        raise ImportError(INSTALL_HINT)
    attend, Tables = api
    t, bits = tile_tables(sel, valid, block_slots)
    # The mask runs on partial tiles only. Block granularity without padding has none: every selected
    # tile is full, and the kernel is compiled without a mask.
    mask_mod, aux = None, None
    if bits is not None:
        mask_mod, aux = _token_mask(block_slots), [bits, valid.to(torch.int32)]
    elif padded:
        mask_mod, aux = _valid_key_mask(), [valid.to(torch.int32)]
    # `FIELDS` order: (partial counts, indices, full counts, indices) of the key tiles of each query tile
    # (forward, dq), then the same of the query tiles of each key tile (dk, dv).
    tables = [t[name] for name in FIELDS]
    forward, backward = (Tables(*tables[i : i + 4], block_size=(TILE, TILE)) for i in (0, 4))
    out, _ = attend(
        q,
        k,
        v,
        mask_mod=mask_mod,
        aux_tensors=aux,
        block_sparse_tensors=forward,
        block_sparse_tensors_bwd=backward,
    )
    return out
