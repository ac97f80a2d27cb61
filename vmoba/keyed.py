"""The `keyed` backend: token granularity as key-centric Triton kernels (forward and backward).

At token granularity every query picks its own key blocks, so the 128 queries of a query tile together
touch almost every key block (98.6% at 25%, docs/notes/09-token-granularity-on-flex.md) and a
query-tiled kernel does dense work under a mask. These kernels turn the loop around, as MoBA's varlen
scheme does: one program per (key tile of `BLOCK_N` slots, batch, head) gathers the queries that chose
its block into dense tiles of `BLOCK_M` rows, so only selected (query, key) pairs are computed.

A program cannot finish a query's softmax alone (the query's other blocks are other programs'), so:

- forward pass 1: each query's exact max logit over its selected keys (`atomic_max`), skipped when a
  bound from the norms, `|q| max|k| / sqrt(D)`, is close enough (`row_offsets`; bf16);
- forward pass 2: with that max (or bound) as the offset, each program adds `exp(s - m) @ v` and the row
  sums to fp32 accumulators (`atomic_add`); out = acc / sum, lse = m + log(sum). The offset only keeps exp
  in range, so the result is exact softmax attention whatever the order of the additions;
- backward: FlashAttention-2's key-centric loop over the gathered tiles, dk and dv in registers, dq by
  `atomic_add`, its products taken key-major (`s^T = k q^T`: 128 key rows, the shape wgmma wants).

The queries come from per-block row lists (`row_lists`, CSR: each key block's selected query rows,
ascending): a transpose of the selection into bit columns, a count per block, a cumsum, one host sync to
size the lists (the number of selected pairs, 287 MB of int32 at 55K tokens and 25%), then a compaction.
The lists make each program's tile loop a counted loop, which Triton software-pipelines; an in-kernel scan
of the bit columns instead (sync-free) was ~15 ms slower at 55K tokens (docs/notes/17-keyed-row-lists.md).
"""

from __future__ import annotations

import torch

from . import _keyed_cuda
from .gather import has_triton
from .options import DEFAULT_OPTIONS, KernelOptions
from .partition import SAME_ORDER

BLOCK_N = 128  # the partition pads blocks to a multiple of it
_DTYPES = (torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634
# The largest norm bound (log2 units) that may stand in for the exact row max (`row_offsets`).
BOUND_LIMIT = 51.0


def unsupported(q: torch.Tensor) -> str | None:
    """Why `keyed` cannot run on q [B, L, H, D] (None when it can)."""
    if q.dtype not in _DTYPES:
        return f"keyed needs fp16 or bf16 q, k, v, got {q.dtype}"
    D = q.shape[-1]
    if D not in (16, 32, 64, 128):  # 256 would hold 2 x 64 KB of keys and values per program
        return f"keyed needs a head dim of 16, 32, 64 or 128, got {D}"
    if not q.is_cuda:
        return "keyed runs on CUDA GPUs only"
    if not has_triton():
        return "keyed needs Triton (it ships with PyTorch's CUDA wheels)"
    return None


def _kernels():
    """vmoba/_keyed_kernels.py, imported on first use (as Triton is)."""
    from . import _keyed_kernels

    return _keyed_kernels


def column_counts(sel: torch.Tensor, valid: torch.Tensor, bits: torch.Tensor | None = None) -> torch.Tensor:
    """Per key block, the valid query rows that picked it: one pass over a token selection, no host sync.

    Args:
        sel: bool [B, H, L, C]; valid: bool [L]; bits: optional uint8 [B, H, C, L // 8] (L % 8 == 0), filled
            with each block's column of picked rows as bits (row l is bit l % 8 of byte l // 8).
    Returns:
        int32 [B, H, C].
    """
    B, H, L, C = sel.shape
    counts = torch.zeros(B, H, C, dtype=torch.int32, device=sel.device)
    sel8 = sel.contiguous().view(torch.uint8)
    # Tall tiles: 256 rows make 32 whole bytes of each column's bits (0.31 ms at 55K tokens against 0.45
    # with 64 x 64, docs/notes/27-gate-and-list-kernels.md).
    grid = (-(-L // 256), -(-C // 32), B * H)
    _kernels().columns[grid](
        sel8, valid.view(torch.uint8), sel8 if bits is None else bits, counts, L, C,
        BLOCK_L=256, BLOCK_C=32, BITS=bits is not None,
    )  # fmt: skip
    return counts


def row_lists(
    sel: torch.Tensor, valid: torch.Tensor, block_slots: int, scan: int = DEFAULT_OPTIONS.keyed_scan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each key block's selected query rows, as CSR lists (one host sync, to size them).

    Args:
        sel: bool [B, H, R, C] selection (R = L tokens or C blocks); valid: bool [L] (L % 8 == 0);
            block_slots: slots per block (L = C * block_slots); scan: bits of a column compacted per step
            (`KernelOptions.keyed_scan`).
    Returns:
        starts int64 [B*H*C + 1], rows int32 [max(pairs, 1)]: rows[starts[i]:starts[i + 1]] are the query
        rows (ascending, padded queries never) that picked block i % C of batch-head i // C.
    """
    L = valid.shape[0]
    if sel.shape[2] != L:  # block granularity: each block's rows share its selection
        sel = sel.repeat_interleave(block_slots, dim=2)
    B, H, _, C = sel.shape
    bits = torch.empty(B, H, C, L // 8, dtype=torch.uint8, device=sel.device)
    counts = column_counts(sel, valid, bits)
    starts = torch.zeros(B * H * C + 1, dtype=torch.int64, device=sel.device)
    torch.cumsum(counts.view(-1), 0, out=starts[1:])
    pairs = int(starts[-1])  # the host sync
    rows = torch.empty(max(pairs, 1), dtype=torch.int32, device=sel.device)  # never a null pointer
    _kernels().compact[(B * H * C,)](bits, starts, rows, L, SCAN=scan, num_warps=2)
    return starts, rows


def _launch(
    PASS,
    q,
    k,
    v,
    acc,
    stat,
    stat2,
    starts,
    rows,
    valid,
    skip=None,
    do=None,
    dk=None,
    dv=None,
    tiles=DEFAULT_OPTIONS.keyed_tiles,
):
    """One pass of the `keyed` kernel over block-order q, k, v [B, L, H, D] and the row lists, on tile
    `tiles[PASS]` (`KernelOptions.keyed_tiles`).

    PASS 0 reads q, k and atomically maxes `stat` (row max, log2 units, [B, H, L]), unless `skip` (bool [] on
    device) is set; PASS 1 also reads v and `stat`, and adds to `acc` (the output's fp32 [B, L, H, D]
    accumulator) and `stat2` (row sums). PASS 2, the backward, reads q, k, v, `do`, `stat` (lse) and `stat2`
    (delta), adds dq to `acc` and writes `dk`, `dv` (the backward's only arguments).
    """
    B, L, H, D = q.shape
    C = (starts.shape[0] - 1) // (B * H)
    block_m, block_n, warps, stages = tiles[PASS]
    key_tiles = L // block_n
    # The forward passes q, k, v where do, dk, dv go: pointers its passes never touch.
    _kernels().keyed[(key_tiles, B * H)](
        q, k, v, q if do is None else do, acc, stat, stat2, k if dk is None else dk, v if dv is None else dv,
        starts, rows, valid, starts if skip is None else skip,  # starts[0] == 0: never skip
        L, C, H, q.stride(0), q.stride(1), key_tiles // C, D**-0.5 * _LOG2E, D**-0.5,
        PASS=PASS, D=D, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, num_warps=warps,
    )  # fmt: skip


def accumulate(
    qb, kb, vb, acc, offsets, row_sum, starts, rows, valid, cuda: bool, tiles=DEFAULT_OPTIONS.keyed_tiles
) -> None:
    """Forward pass 1 (module docstring): add `exp2(s - offset) @ v` to `acc` and the row sums to `row_sum`,
    on Hopper's warp-specialised CUDA kernel when `cuda` (`_keyed_cuda.usable`), else on Triton's (`tiles`)."""
    if cuda:
        _keyed_cuda.accumulate(qb, kb, vb, acc, offsets, row_sum, starts, rows, valid)
    else:
        _launch(1, qb, kb, vb, acc, offsets, row_sum, starts, rows, valid, tiles=tiles)


def backward_pass(
    qb, kb, vb, do, dq, dk, dv, lse, delta, starts, rows, valid, cuda: bool, tiles=DEFAULT_OPTIONS.keyed_tiles
) -> None:
    """The backward: add dq to the fp32 `dq`, write `dk`, `dv`; on the CUDA kernel when `cuda`, as above."""
    if cuda:
        _keyed_cuda.backward(qb, kb, vb, do, dq, dk, dv, lse, delta, starts, rows, valid)
    else:
        _launch(2, qb, kb, vb, dq, lse, delta, starts, rows, valid, do=do, dk=dk, dv=dv, tiles=tiles)


def _rowwise(kernel, *tensors: torch.Tensor) -> None:
    """Run `finish` or `row_dot` (vmoba/_keyed_kernels.py) over the rows of contiguous [B, L, H, D] tensors."""
    B, L, H, D = tensors[0].shape
    rows = 32
    kernel[(-(-B * L * H // rows),)](*tensors, B * L * H, L, H, D=D, ROWS=rows)


def row_offsets(qb: torch.Tensor, kb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax offsets that need no pass over the keys, and whether they may replace the exact row max.

    Row i's max logit over any keys is at most `off_i = |q_i| max_j |k_j| / sqrt(D)` (Cauchy-Schwarz) and at
    least `-off_i`, so with `off_i` as the offset the largest `p = 2^(s - off_i)` of the row is at least
    `2^(-2 off_i)`. At `off_i <= BOUND_LIMIT` (51, log2 units) that is >= 2^-102: every p that can change an
    fp32 sum (within 2^-24 of the row's largest) is a normal number in fp32 and bf16 (down to 2^-126), so
    the sums keep full relative precision. fp16 keeps the exact max: p is cast to v's dtype for the
    product, and fp16 flushes p below 2^-24.

    Args:
        qb, kb: [B, L, H, D] contiguous, fp16 or bf16.
    Returns:
        offsets fp32 [B, H, L] (log2 units); usable: bool [] on device (no host sync).
    """
    B, L, H, _ = qb.shape
    q2, k2 = (torch.empty(B, H, L, dtype=torch.float32, device=qb.device) for _ in range(2))
    _rowwise(_kernels().row_dot, qb, qb, q2)
    _rowwise(_kernels().row_dot, kb, kb, k2)
    offsets = (q2 * k2.amax(-1, keepdim=True)).sqrt_() * (qb.shape[-1] ** -0.5 * _LOG2E)
    return offsets, (offsets.amax() <= BOUND_LIMIT) & (qb.dtype == torch.bfloat16)


class _Keyed(torch.autograd.Function):
    """out = from_blocks(attention(to_blocks(q), to_blocks(k), to_blocks(v))): the block order is taken
    outside autograd, so on CUDA it is the row gather (`vmoba.gather`) both ways."""

    @staticmethod
    def forward(ctx, q, k, v, starts, rows, valid, order, blocks, options: KernelOptions):
        qb, kb, vb = (t.contiguous() for t in (blocks or [order.to_blocks(x) for x in (q, k, v)]))
        offsets, bounded = row_offsets(qb, kb)
        # The bound where it is usable, else -inf for pass 0's exact row max (decided on the device).
        row_max = torch.where(bounded, offsets, -torch.inf)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(qb.shape, dtype=torch.float32, device=q.device)
        ctx.tiles = options.keyed_tiles
        _launch(0, qb, kb, vb, acc, row_max, row_sum, starts, rows, valid, skip=bounded, tiles=ctx.tiles)
        # Hopper: pass 1 and the backward as warp-specialised CUDA kernels (vmoba/_keyed.cu), decided once.
        ctx.cuda = _keyed_cuda.usable(qb, options.keyed_cuda)
        accumulate(qb, kb, vb, acc, row_max, row_sum, starts, rows, valid, ctx.cuda, ctx.tiles)
        # Rows that selected nothing (padding) have sum 0: output 0, lse -inf (log2 units).
        out_b, lse = torch.empty_like(qb), torch.empty_like(row_max)
        _rowwise(_kernels().finish, acc, row_max, row_sum, out_b, lse)
        del acc
        ctx.save_for_backward(qb, kb, vb, out_b, lse, starts, rows, valid)
        ctx.order = order
        return order.from_blocks(out_b)

    @staticmethod
    def backward(ctx, grad_out):
        qb, kb, vb, out_b, lse, starts, rows, valid = ctx.saved_tensors
        grad_b = ctx.order.to_blocks(grad_out).contiguous()
        delta = torch.empty_like(lse)  # rowsum(dO * O), [B, H, L]
        _rowwise(_kernels().row_dot, grad_b, out_b, delta)
        dq = torch.zeros(qb.shape, dtype=torch.float32, device=qb.device)
        dk, dv = torch.empty_like(kb), torch.empty_like(vb)
        backward_pass(qb, kb, vb, grad_b, dq, dk, dv, lse, delta, starts, rows, valid, ctx.cuda, ctx.tiles)
        grads = (ctx.order.from_blocks(g) for g in (dq.to(qb.dtype), dk, dv))
        return (*grads, None, None, None, None, None, None)


def keyed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    block_slots: int,
    valid: torch.Tensor,
    order=None,
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """Token- or block-granularity sparse attention through the key-centric Triton kernels.

    Args:
        q, k, v: [B, N, H, D] fp16/bf16 (`unsupported(q)` is None), in block order, or in `order`'s raster
            order when it is given.
        sel: bool [B, H, R, C], R = L (token granularity) or C (block granularity); valid: bool [L]; in block
            order L = C * block_slots, block_slots a multiple of `BLOCK_N`.
        order: None, or an object with `to_blocks(x)` ([B, N, H, D] -> [B, L, H, D]) and its inverse
            `from_blocks(y)`, e.g. `vmoba.partition.BlockOrder`.
        blocks: `order.to_blocks` of q, k, v if already computed.
        options: its `keyed_tiles`, `keyed_scan` and `keyed_cuda` apply.
    Returns:
        [B, N, H, D] in q's dtype, in q's order (zeros at padded query slots of the block order);
        differentiable w.r.t. q, k and v.
    """
    L = valid.shape[0]
    if block_slots % BLOCK_N or L % block_slots:
        raise ValueError(f"keyed needs blocks of a multiple of {BLOCK_N} slots, got {block_slots}")
    starts, rows = row_lists(sel, valid, block_slots, options.keyed_scan)
    return _Keyed.apply(q, k, v, starts, rows, valid.view(torch.uint8), order or SAME_ORDER, blocks, options)
