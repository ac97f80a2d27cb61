"""Triton kernels of the `keyed` backend (see `vmoba.keyed`); imported on first use, as Triton is."""

import triton
import triton.language as tl


@triton.jit
def tile(
    Q, DO, Acc, Stat, Stat2, base, stat_base, rows, row_ok, k, v, key_ok, dk, dv,
    stride_l, scale_log2, sm_scale, PASS: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """One gathered tile of queries `rows` [BLOCK_M] against the program's keys; returns (dk, dv). Acc is the
    fp32 [B, L, H, D] accumulator the tile adds its rows to: the output (PASS 1) or dq (PASS 2)."""
    offs_d = tl.arange(0, D)
    row_ptrs = base + rows.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
    q = tl.load(Q + row_ptrs, mask=row_ok[:, None], other=0.0)
    if PASS == 0:  # the row max over this tile's valid keys
        s = tl.dot(q, tl.trans(k)) * scale_log2  # fp32 [BLOCK_M, BLOCK_N], log2 units
        m = tl.max(tl.where(key_ok[None, :], s, -float("inf")), 1)
        tl.atomic_max(Stat + stat_base + rows, m, mask=row_ok, sem="relaxed")
    elif PASS == 1:  # exp(s - m) @ v and the row sums, offset by the first pass's row max
        s = tl.dot(q, tl.trans(k)) * scale_log2
        m = tl.load(Stat + stat_base + rows, mask=row_ok, other=0.0)
        p = tl.where(key_ok[None, :], tl.math.exp2(s - m[:, None]), 0.0)
        tl.atomic_add(Stat2 + stat_base + rows, tl.sum(p, 1), mask=row_ok, sem="relaxed")
        o = tl.dot(p.to(v.dtype), v)
        tl.atomic_add(Acc + row_ptrs, o, mask=row_ok[:, None], sem="relaxed")
    elif PASS == 2:  # backward: Stat = lse (log2 units), Stat2 = delta = rowsum(dO * O)
        # Key-major (s^T = k q^T, [BLOCK_N, BLOCK_M]): every product but dq has the 128 keys as its rows,
        # the shape Hopper's wgmma wants; 1.5x faster than query-major at 55K
        # (docs/notes/17-keyed-row-lists.md). The forward passes measured faster query-major.
        lse = tl.load(Stat + stat_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(Stat2 + stat_base + rows, mask=row_ok, other=0.0)
        do = tl.load(DO + row_ptrs, mask=row_ok[:, None], other=0.0)
        st = tl.dot(k, tl.trans(q)) * scale_log2
        pt = tl.math.exp2(st - lse[None, :])
        pt = tl.where(key_ok[:, None] & row_ok[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q)
        dq = tl.dot(tl.trans(dst.to(k.dtype)), k) * sm_scale
        tl.atomic_add(Acc + row_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def keyed(
    Q, K, Vv, DO, Acc, Stat, Stat2, DK, DV, Starts, Rows, Valid, Skip,
    L, C, H, stride_b, stride_l, tiles_per_block, scale_log2, sm_scale,
    PASS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Program (key tile, b * H + h): PASS 0 / 1 forward passes, 2 backward (module docstring)."""
    key_tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    base = b.to(tl.int64) * stride_b + h * D
    stat_base = bh.to(tl.int64) * L
    offs_n = key_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    key_ptrs = base + offs_n.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
    k = tl.load(K + key_ptrs)
    v = tl.load(Vv + key_ptrs)
    key_ok = tl.load(Valid + offs_n) != 0
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    cell = bh.to(tl.int64) * C + key_tile // tiles_per_block
    start = tl.load(Starts + cell)
    count = (tl.load(Starts + cell + 1) - start).to(tl.int32)
    if PASS == 0:  # Skip != 0: the row max is not needed (`vmoba.keyed.row_offsets`)
        count = tl.where(tl.load(Skip) != 0, 0, count)
    lanes = tl.arange(0, BLOCK_M)
    # A counted loop over the block's row list, which Triton software-pipelines (STAGES): the next tiles'
    # rows are loaded while this one computes (docs/notes/17-keyed-row-lists.md).
    for first in tl.range(0, count, BLOCK_M, num_stages=STAGES):
        row_ok = first + lanes < count
        rows = tl.load(Rows + start + first + lanes, mask=row_ok, other=0)
        dk, dv = tile(
            Q, DO, Acc, Stat, Stat2, base, stat_base, rows, row_ok, k, v, key_ok,
            dk, dv, stride_l, scale_log2, sm_scale, PASS, D,
        )  # fmt: skip
    if PASS == 2:
        tl.store(DK + key_ptrs, (dk * sm_scale).to(k.dtype))
        tl.store(DV + key_ptrs, dv.to(v.dtype))


@triton.jit
def _rows_of(N, L, H, D: tl.constexpr, ROWS: tl.constexpr):
    """This program's ROWS rows of a contiguous [B, L, H, D] tensor seen as N = B*L*H rows of D: (in range
    [ROWS], offsets [ROWS, D], offsets [ROWS] in a [B, H, L] statistic)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = r < N
    h, bl = r % H, r // H
    stat = ((bl // L) * H + h).to(tl.int64) * L + bl % L
    offs = r.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
    return ok, offs, stat


@triton.jit
def finish(Acc, RowMax, RowSum, Out, Lse, N, L, H, D: tl.constexpr, ROWS: tl.constexpr):
    """Forward epilogue: Out = Acc / RowSum in Out's dtype (0 where a row selected nothing) and
    Lse = RowMax + log2(RowSum) (log2 units, -inf there); Acc, Out [B, L, H, D], the others [B, H, L]."""
    ok, offs, stat = _rows_of(N, L, H, D, ROWS)
    total = tl.load(RowSum + stat, mask=ok, other=1.0)
    acc = tl.load(Acc + offs, mask=ok[:, None], other=0.0)
    out = acc / tl.maximum(total, 1e-30)[:, None]
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=ok[:, None])
    tl.store(Lse + stat, tl.load(RowMax + stat, mask=ok, other=0.0) + tl.math.log2(total), mask=ok)


@triton.jit
def row_dot(A, B, Out, N, L, H, D: tl.constexpr, ROWS: tl.constexpr):
    """Out [B, H, L] = rowsum(A * B) in fp32; A, B [B, L, H, D]. The backward's delta = rowsum(dO * O), and
    the squared row norms of q and k (the forward's offsets)."""
    ok, offs, stat = _rows_of(N, L, H, D, ROWS)
    a = tl.load(A + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(Out + stat, tl.sum(a * b, 1), mask=ok)


@triton.jit
def columns(Sel, Valid, Bits, Counts, L, C, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BITS: tl.constexpr):
    """Sel int8 [B*H, L, C] (a token selection) -> Counts int32 [B*H, C] (zeroed) += the valid rows (Valid != 0)
    each column picked; with BITS, also Bits uint8 [B*H, C, L // 8]: each key block's column of query rows
    as bits (row l is bit l % 8 of byte l // 8), padded queries never picked. A tiled transpose: PyTorch's
    copy of a transposed bool tensor moves bytes one at a time (~3 ms at 55K tokens), and `compact` reads
    the bits coalesced."""
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bh = tl.program_id(2).to(tl.int64)
    inside = (rows[:, None] < L) & (cols[None, :] < C)
    valid = tl.load(Valid + rows, mask=rows < L, other=0)
    picked = tl.load(Sel + (bh * L + rows[:, None]) * C + cols[None, :], mask=inside, other=0)
    picked = (picked * valid[:, None]).to(tl.int32)
    tl.atomic_add(Counts + bh * C + cols, tl.sum(picked, 0), mask=cols < C, sem="relaxed")
    if BITS:
        picked = tl.trans(picked << (rows % 8)[:, None])  # [BLOCK_C, BLOCK_L]
        packed = tl.sum(tl.reshape(picked, [BLOCK_C, BLOCK_L // 8, 8]), 2).to(tl.uint8)
        bytes_ = tl.program_id(0) * (BLOCK_L // 8) + tl.arange(0, BLOCK_L // 8)
        mask = (cols[:, None] < C) & (bytes_[None, :] < L // 8)
        tl.store(Bits + (bh * C + cols[:, None]) * (L // 8) + bytes_[None, :], packed, mask=mask)


@triton.jit
def compact(Bits, Starts, Rows, L, SCAN: tl.constexpr):
    """Program `cell` of B*H*C: Rows[Starts[cell]:Starts[cell + 1]] = the rows whose bit is set in the
    column Bits[cell] (uint8 [L // 8]), ascending, so the attention programs read their rows in L order
    (the accumulator rows their atomics hit are shared and stay in L2)."""
    cell = tl.program_id(0).to(tl.int64)
    column = Bits + cell * (L // 8)
    at = tl.load(Starts + cell)
    for start in range(0, L, SCAN):
        offs = start + tl.arange(0, SCAN)
        picked = (tl.load(column + offs // 8, mask=offs < L, other=0).to(tl.int32) >> (offs % 8)) & 1
        tl.store(Rows + at + tl.cumsum(picked, 0) - picked, offs, mask=picked != 0)
        at += tl.sum(picked, 0)
