"""Triton kernels of `vmoba.selection` on CUDA (imported on first use): token gate scores on tensor cores,
and the per-query rules (query scope).

`token_scores`: bf16 queries against the fp32 block means, each split in the kernel into three bf16 parts
(`hi + mid + lo` equals the mean exactly: each remainder fits in fp32): every product of two bf16 numbers
is exact in fp32, so three bf16 `tl.dot`s accumulating in fp32 give the fp32 product at tensor-core speed.

The rules: one program holds `BLOCK_R` rows of fp32 gate scores `[B*H, R, C]` in registers and writes the
int8 selection of the same shape. Both rules reduce to "the best `quota` candidates of the row" (ties:
lower column first, as a stable descending sort); the `quota`-th best key is found bit by bit from the
top, at most 32 counting passes instead of a sort. The row's own column (block `r // rows_per_block`) is
never a candidate and always selected; rows with Valid[r] == 0 get their own column only.
"""

import triton
import triton.language as tl


@triton.jit
def token_scores(
    Q, Means, Out, L, C, H, stride_qb, stride_ql, stride_qh, stride_mb, stride_mc, stride_mh,
    D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Out fp32 [B, H, L, C] = Q [B, L, H, D] (bf16) @ Means^T, the fp32 block means [B, C, H, D] (both with
    any strides but the last); program (L tile, C tile, b * H + h)."""
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bh = tl.program_id(2)
    b, h = (bh // H).to(tl.int64), bh % H
    d = tl.arange(0, D)
    q_ptrs = Q + b * stride_qb + rows.to(tl.int64)[:, None] * stride_ql + h * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=(rows < L)[:, None], other=0.0)
    m_ptrs = Means + b * stride_mb + cols[:, None] * stride_mc + h * stride_mh + d[None, :]
    mean = tl.load(m_ptrs, mask=(cols < C)[:, None], other=0.0)
    hi = mean.to(tl.bfloat16)  # each part the next 8 bits of the mean
    rest = mean - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    acc = tl.dot(q, tl.trans(lo))  # smallest part first
    acc = tl.dot(q, tl.trans(mid), acc)
    acc = tl.dot(q, tl.trans(hi), acc)
    out = Out + (bh.to(tl.int64) * L + rows[:, None]) * C + cols[None, :]
    tl.store(out, acc, mask=(rows < L)[:, None] & (cols < C)[None, :])


@triton.jit
def _keys(x):
    """fp32 -> order-preserving uint32 (flip all bits of negatives, the sign bit of positives); -0.0 as 0.0."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, ~bits, bits | -2147483648).to(tl.uint32, bitcast=True)


@triton.jit
def _best(key, candidate, quota, BLOCK_R: tl.constexpr):
    """bool [BLOCK_R, BLOCK_C]: each row's `quota` [BLOCK_R] best candidates by `key`, ties to the lower column."""
    key = tl.where(candidate, key, 0)  # below every candidate's key
    t = tl.zeros([BLOCK_R], dtype=tl.uint32)  # the largest t with count(key >= t) >= quota
    count = tl.full([BLOCK_R], -1, dtype=tl.int32)  # count(key >= t) once known
    one = tl.full([BLOCK_R], 1, dtype=tl.uint32)
    i = 0
    # Once count(key >= t) == quota in every row, the lower bits cannot change the picks (the keys >= the
    # final t are these same quota keys), so the search stops early: fp32 scores need ~20 of the 32 passes.
    while (i < 32) & (tl.sum((count != quota).to(tl.int32), 0) > 0):
        trial = t | (one << tl.cast(31 - i, tl.uint32))
        n = tl.sum((key >= trial[:, None]).to(tl.int32), 1)
        t = tl.where(n >= quota, trial, t)
        count = tl.where(n >= quota, n, count)
        i += 1
    above = candidate & (key > t[:, None])
    tie = candidate & (key == t[:, None])
    room = quota - tl.sum(above.to(tl.int32), 1)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), 1) <= room[:, None]))


@triton.jit
def _rows(Scores, Valid, R, C, rows_per_block, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's rows: (offsets, scores, in-range mask, own-column mask, valid rows [BLOCK_R])."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    bh = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    inside = (r < R)[:, None] & (cols[None, :] < C)
    offs = (bh * R + r[:, None]) * C + cols[None, :]
    x = tl.load(Scores + offs, mask=inside, other=0.0)
    own = (cols[None, :] == (r // rows_per_block)[:, None]) & inside
    valid = tl.load(Valid + r, mask=r < R, other=0) != 0
    return offs, x, inside, own, valid


@triton.jit
def topk_rows(Scores, Out, Valid, R, C, rows_per_block, budget, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Top-k: the `budget` best other columns of each valid row."""
    offs, x, inside, own, valid = _rows(Scores, Valid, R, C, rows_per_block, BLOCK_R, BLOCK_C)
    candidate = inside & ~own
    picked = _best(_keys(x), candidate, tl.where(valid, budget, 0), BLOCK_R) | own
    tl.store(Out + offs, picked.to(tl.int8), mask=inside)


@triton.jit
def threshold_rows(
    Scores, Out, Valid, R, C, rows_per_block, tau, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):  # fmt: skip
    """Threshold: min-max normalise each valid row, n = (x - lo) / span; need = max(tau - n_own / sum(n), 0);
    take the shortest prefix of the other columns by n, descending, whose preceding shares stay below need
    (`vmoba.selection` module docstring), at least one; all of them at tau >= 1."""
    offs, x, inside, own, valid = _rows(Scores, Valid, R, C, rows_per_block, BLOCK_R, BLOCK_C)
    active = inside & valid[:, None]
    lo = tl.min(tl.where(active, x, float("inf")), 1)
    hi = tl.max(tl.where(active, x, -float("inf")), 1)
    span = tl.where(hi - lo > 1e-6, hi - lo, 1.0)
    n = tl.where(active, (x - lo[:, None]) / span[:, None], 0.0)
    total = tl.sum(n, 1)
    total = tl.where(total > 0, total, 1.0)
    share = n / total[:, None]
    need = tl.maximum(tau - tl.sum(tl.where(own, share, 0.0), 1), 0.0)
    need = tl.where(tau >= 1.0, float("inf"), need)  # all the mass: every candidate, whatever the rounding
    candidate = active & ~own
    key = tl.where(candidate, _keys(n), 0)
    # Candidate i is taken when the shares ranked above it sum below need. With G(t) = sum of the shares of
    # keys > t (non-increasing), the taken keys are those >= t_star, the smallest t with G(t) < need;
    # within the lowest taken tie group only the first m members, G + m * share < need.
    t = tl.zeros([BLOCK_R], dtype=tl.uint32)  # the largest t with G(t) >= need
    one = tl.full([BLOCK_R], 1, dtype=tl.uint32)
    for bit in range(31, -1, -1):
        trial = t | (one << bit)
        still = tl.sum(tl.where(key > trial[:, None], share, 0.0), 1) >= need
        t = tl.where(still, trial, t)
    reached = tl.sum(tl.where(key > t[:, None], share, 0.0), 1) >= need  # False: every candidate is taken
    top = tl.max(tl.where(candidate, key, 0), 1)
    lowest = tl.min(tl.where(candidate & (key > t[:, None]), key, top[:, None]), 1)
    lowest = tl.where(reached, lowest, tl.min(tl.where(candidate, key, top[:, None]), 1))
    g = tl.sum(tl.where(key > lowest[:, None], share, 0.0), 1)
    tie = candidate & (key == lowest[:, None])
    m = tl.cumsum(tie.to(tl.int32), 1) - 1
    tie_share = tl.max(tl.where(tie, share, 0.0), 1)
    taken = (candidate & (key > lowest[:, None])) | (
        tie & (g[:, None] + m * tie_share[:, None] < need[:, None])
    )
    # At least one: the first of the lowest group is the best candidate when nothing else is taken (need 0).
    picked = taken | (tie & (m == 0)) | own
    tl.store(Out + offs, picked.to(tl.int8), mask=inside)
