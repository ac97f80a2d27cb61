"""Triton kernel of `vmoba.selection`'s per-query top-k on CUDA; imported on first use, as Triton is."""

import triton
import triton.language as tl


@triton.jit
def topk_rows(
    Scores, Out, Valid, R, C, rows_per_block, budget,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Rows r [BLOCK_R] of head b * H + h = program_id(1): scores fp32 [B*H, R, C] -> Out int8 [B*H, R, C]:
    the `budget` best columns other than the row's own (ties: lower column first, as a stable descending
    sort), plus the own column; rows with Valid[r] == 0 get their own column only."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    bh = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    row_in = r < R
    inside = row_in[:, None] & (cols[None, :] < C)
    own = cols[None, :] == (r // rows_per_block)[:, None]
    offs = (bh * R + r[:, None]) * C + cols[None, :]
    x = tl.load(Scores + offs, mask=inside, other=0.0)
    # Order-preserving unsigned keys (IEEE floats: flip all bits of negatives, the sign bit of positives);
    # 0 for the columns that are not candidates, below every real score's key.
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)  # -0.0 ties with 0.0, as in a sort
    key = tl.where(bits < 0, ~bits, bits | -2147483648).to(tl.uint32, bitcast=True)
    candidate = inside & ~own
    key = tl.where(candidate, key, 0)
    quota = tl.where(tl.load(Valid + r, mask=row_in, other=0) != 0, budget, 0)
    # The quota-th largest key of each row, bit by bit from the top: the largest t with count(key >= t) >= quota.
    t = tl.zeros([BLOCK_R], dtype=tl.uint32)
    one = tl.full([BLOCK_R], 1, dtype=tl.uint32)
    for bit in range(31, -1, -1):
        trial = t | (one << bit)
        enough = tl.sum((key >= trial[:, None]).to(tl.int32), 1) >= quota
        t = tl.where(enough, trial, t)
    above = candidate & (key > t[:, None])
    tie = candidate & (key == t[:, None])
    room = quota - tl.sum(above.to(tl.int32), 1)
    tie_rank = tl.cumsum(tie.to(tl.int32), 1)
    picked = above | (tie & (tie_rank <= room[:, None])) | (own & row_in[:, None])
    tl.store(Out + offs, picked.to(tl.int8), mask=inside)
