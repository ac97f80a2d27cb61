"""The VMoBA gate and block selection as pure tensor functions (no kernels, no host syncs).

Gate: a key block is represented by the fp32 mean of its valid keys; a query (token granularity) or a
query block's fp32 mean (block granularity) scores every key block by a plain dot product (no 1/sqrt(D)).
Selection then picks blocks per head, sharing its budget over a *scope*:

- `query`: per (head, query row) over its C blocks (the original VMoBA code's default);
- `head`: over all (query row, block) pairs of a head (the paper's global block selection);
- `block`: per key block, over all (head, query row) pairs;
- `overall`: over all (head, query row, block) triples of a batch element.

Within a scope set, `threshold` min-max normalises the scores `n = (g - min) / (max - min)` (denominator 1
when <= 1e-6), computes `need = max(tau - sum(n_own) / sum(n), 0)`, sorts the other candidates by `n`
descending and takes the shortest prefix whose cumulative share `>= need`, always at least one
(all of them when none reaches it, and
always all of them at `tau = 1`). `topk` takes the best `(k - 1) / (C - 1)` of the set's candidate (query row, other block)
pairs (rounded), i.e. exactly `k - 1` other blocks per query in `query` scope, `(k - 1) * rows` per head
in `head` scope.
A query row's own block is always selected on top of either rule.
"""

from __future__ import annotations

import torch

from .config import GRANULARITIES, SCOPES, SELECTIONS
from .gather import has_triton
from .options import DEFAULT_OPTIONS
from .partition import BlockLayout


def block_means(x: torch.Tensor, block_size: int, valid: torch.Tensor) -> torch.Tensor:
    """fp32 mean of the valid tokens of each block: x [B, C*S, H, D], valid bool [C*S] -> [B, C, H, D]."""
    B, L, H, D = x.shape
    keep = valid.view(1, L // block_size, block_size, 1, 1)
    # Accumulate in fp32 without an fp32 copy of x (3x less memory traffic on a bf16 x).
    sums = torch.where(keep, x.view(B, L // block_size, block_size, H, D), 0).sum(2, dtype=torch.float32)
    return sums / keep.sum(2, dtype=torch.float32).clamp(min=1.0)


def gate_scores(
    q: torch.Tensor, k_mean: torch.Tensor, block_size: int, valid: torch.Tensor, granularity: str
) -> torch.Tensor:
    """fp32 gate scores: q [B, C*S, H, D] in block order against the key blocks' fp32 means k_mean
    [B, C, H, D] (`block_means`, any strides) -> [B, H, R, C] (R = C*S tokens or C blocks). The means are
    the caller's, so a gate taken a few heads at a time computes them once."""
    with torch.autocast(q.device.type, enabled=False):  # the gate is fp32 even inside a bf16 autocast region
        if granularity == "token" and _tensor_core_scores_usable(q):
            return _tensor_core_scores(q, k_mean)
        q_rows = q.float() if granularity == "token" else block_means(q, block_size, valid)
        return torch.einsum("brhd,bchd->bhrc", q_rows, k_mean)


def _tensor_core_scores_usable(q: torch.Tensor) -> bool:
    if not (q.is_cuda and q.dtype == torch.bfloat16 and q.shape[-1] in (16, 32, 64, 128) and has_triton()):
        return False
    return torch.cuda.get_device_capability(q.device)[0] >= 8  # bf16 tensor cores: Ampere and later


def _tensor_core_scores(q: torch.Tensor, k_mean: torch.Tensor) -> torch.Tensor:
    """Token gate scores as three bf16 products on tensor cores (`vmoba/_select_kernels.py`): bf16 q
    [B, L, H, D], fp32 k_mean [B, C, H, D] (any strides) -> fp32 [B, H, L, C], the fp32 product within
    rounding. The einsum's fp32 product at 55K tokens takes ~2.2 ms and an fp32 copy of q; a TF32 setting
    (`torch.backends.cuda.matmul.allow_tf32`) would also round it to 10 bits, this path never does."""
    from . import _select_kernels

    B, L, H, D = q.shape
    C = k_mean.shape[1]
    q, k_mean = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_mean))
    out = torch.empty(B, H, L, C, dtype=torch.float32, device=q.device)
    block_l, block_c = 128, 64
    _select_kernels.token_scores[(-(-L // block_l), -(-C // block_c), B * H)](
        q, k_mean, out, L, C, H, *q.stride()[:3], *k_mean.stride()[:3], D=D, BLOCK_L=block_l, BLOCK_C=block_c,
    )  # fmt: skip
    return out


def _threshold_sets(x, own, active, tau):
    """Threshold rule on scope sets: x, own, active [N, S] -> bool [N, S] (own not included)."""
    inf = torch.finfo(x.dtype).max
    lo = torch.where(active, x, inf).amin(-1, keepdim=True)
    hi = torch.where(active, x, -inf).amax(-1, keepdim=True)
    span = hi - lo
    span = torch.where(span > 1e-6, span, torch.ones_like(span))
    n = torch.where(active, (x - lo) / span, torch.zeros_like(x))
    total = n.sum(-1, keepdim=True)
    total = torch.where(total > 0, total, torch.ones_like(total))
    need = (tau - (n * own).sum(-1, keepdim=True) / total).clamp(min=0.0)
    if tau >= 1.0:  # all the mass: take everything (rounding must not drop the zero-score block)
        need = torch.full_like(need, torch.inf)
    candidate = active & ~own
    # Non-candidates sort last (-1 < every normalised score); a stable sort keeps ties deterministic.
    ranked, order = torch.where(candidate, n, -torch.ones_like(n)).sort(dim=-1, descending=True, stable=True)
    share = ranked.clamp(min=0.0) / total
    before = share.cumsum(-1) - share  # cumulative share of the candidates ranked above
    first = torch.zeros_like(candidate)
    first[..., 0] = True
    take = (ranked >= 0) & ((before < need) | first)
    return torch.zeros_like(take).scatter(-1, order, take)


def _topk_sets(x, own, active, fraction):
    """Top-k rule on scope sets [N, S]: the best `fraction` of each set's candidates (own not included)."""
    candidate = active & ~own
    budget = (candidate.sum(-1, keepdim=True) * fraction).round()
    ranked, order = torch.where(candidate, x, torch.full_like(x, -torch.inf)).sort(
        dim=-1, descending=True, stable=True
    )
    rank = torch.arange(x.shape[-1], device=x.device)
    return torch.zeros_like(candidate).scatter(-1, order, rank < budget) & candidate


def select_from_scores(
    scores: torch.Tensor,
    row_valid: torch.Tensor,
    rows_per_block: int,
    *,
    selection: str,
    scope: str,
    threshold: float,
    topk: int,
) -> torch.Tensor:
    """Selection on gate scores: scores [B, H, R, C] fp32 -> bool [B, H, R, C] (own block included).

    `row_valid` bool [R] marks real query rows (padded ones never shape another row's selection);
    query row r's own block is `r // rows_per_block`.
    """
    B, H, R, C = scores.shape
    if scope == "query" and _fused_usable(scores):
        return _fused_select(scores, row_valid, rows_per_block, selection, threshold, min(topk, C) - 1)
    own = (torch.arange(R, device=scores.device) // rows_per_block)[:, None] == torch.arange(
        C, device=scores.device
    )
    own = own.expand(B, H, R, C)
    active = row_valid[:, None].expand(B, H, R, C)
    # Lay each scope set out along the last dim: [N, S].
    to_sets = {
        "query": lambda t: t.reshape(B * H * R, C),
        "head": lambda t: t.reshape(B * H, R * C),
        "block": lambda t: t.permute(0, 3, 1, 2).reshape(B * C, H * R),
        "overall": lambda t: t.reshape(B, H * R * C),
    }[scope]
    sets = [to_sets(t) for t in (scores, own, active)]
    if selection == "threshold":
        picked = _threshold_sets(*sets, threshold)
    else:
        picked = _topk_sets(*sets, (topk - 1) / max(C - 1, 1))
    if scope == "block":
        picked = picked.reshape(B, C, H, R).permute(0, 2, 3, 1)
    return picked.reshape(B, H, R, C) | own


def _fused_usable(scores: torch.Tensor) -> bool:
    from .gather import has_triton

    return scores.is_cuda and scores.dtype == torch.float32 and scores.shape[-1] <= 8192 and has_triton()


def _fused_select(scores, row_valid, rows_per_block: int, selection: str, threshold: float, budget: int):
    """`select_from_scores` in query scope as one Triton pass (`vmoba/_select_kernels.py`): scores fp32
    [B, H, R, C] -> bool [B, H, R, C]. No sort: each row's cut is found bit by bit (32 counting passes in
    registers). Top-k picks exactly what the sort picks (ties to the lower block); the threshold rule
    sums shares in another order than the sort's cumsum, so a row whose cut lies within rounding of
    `need` may take one block more or fewer. 1.1 GB of token scores at 55K tokens: 1.8 ms (top-k) and 3.2
    (threshold) instead of the sort's ~26 (docs/notes/16-keyed-triton-kernels.md,
    docs/notes/27-gate-and-list-kernels.md)."""
    from . import _select_kernels

    B, H, R, C = scores.shape
    picked = torch.empty(B, H, R, C, dtype=torch.int8, device=scores.device)
    width = 1 << max(0, C - 1).bit_length()
    # 16 scores per lane: one warp per row at 512 columns (432 blocks at 55K tokens), which took 1.77 ms
    # for top-k and 3.23 for the threshold rule against 2.32 and 4.43 with 16 rows on 4 warps
    # (docs/notes/27-gate-and-list-kernels.md).
    warps = max(1, min(8, width // 512))
    block_r = max(1, 512 // width)
    kernel, rule = (
        (_select_kernels.topk_rows, budget)
        if selection == "topk"
        else (_select_kernels.threshold_rows, float(threshold))
    )
    kernel[(-(-R // block_r), B * H)](
        scores.contiguous(),
        picked,
        row_valid.to(torch.int8),
        R,
        C,
        rows_per_block,
        rule,
        BLOCK_R=block_r,
        BLOCK_C=width,
        num_warps=warps,
    )
    return picked.view(torch.bool)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    *,
    selection: str = "threshold",
    scope: str = "query",
    threshold: float = 0.25,
    topk: int = 3,
    granularity: str = "token",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The VMoBA gate and block selection (module docstring) on tokens already in block order.

    Args:
        q, k: [B, L, H, D] in block order, uniform blocks of `block_size` tokens (the last may be shorter).
        selection: "threshold" | "topk"; scope: "query" | "head" | "block" | "overall".
        threshold: tau in (0, 1]; topk: blocks per query row including its own, >= 1.
        granularity: "token" (one selection per query) | "block" (per query block, from its mean query).
        valid: optional bool [L], False at padded slots (excluded from block means and from shared scopes).
    Returns:
        bool [B, H, R, C]: R = L query rows ("token") or C query blocks ("block"); C = ceil(L / block_size).
    """
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, L, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be an int > 0, got {block_size!r}")
    _check_selection_args(selection, scope, threshold, topk, granularity)
    B, L, H, D = q.shape
    C = -(-L // block_size)
    if valid is None:
        valid = torch.ones(L, dtype=torch.bool, device=q.device)
    elif valid.shape != (L,) or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool tensor of shape [L] = [{L}], got {valid.dtype} {tuple(valid.shape)}"
        )
    if C * block_size != L:  # a shorter last block: pad it, padded slots invalid
        pad = C * block_size - L
        q, k = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k))
        valid = torch.nn.functional.pad(valid, (0, pad))
    scores = gate_scores(q, block_means(k, block_size, valid), block_size, valid, granularity)
    token = granularity == "token"
    row_valid = valid if token else torch.ones(C, dtype=torch.bool, device=q.device)
    sel = select_from_scores(
        scores,
        row_valid,
        block_size if token else 1,
        selection=selection,
        scope=scope,
        threshold=threshold,
        topk=topk,
    )
    return sel[:, :, :L] if granularity == "token" else sel


def _check_selection_args(selection, scope, threshold, topk, granularity):
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def select(
    qb: torch.Tensor,
    kb: torch.Tensor,
    layout: BlockLayout,
    valid: torch.Tensor,
    config,
    kind: str,
    chunk_bytes: int = DEFAULT_OPTIONS.gate_chunk_bytes,
) -> torch.Tensor:
    """The gate and selection of `vmoba_attention`, on the video tokens of one call in block order.

    Args:
        qb, kb: [B, C*V, H, D] in `layout`'s block order; valid: bool [C*V] (`valid_mask(layout)`);
        config: a `VMoBAConfig`; kind: the layer's partition ("1d" | "2d" | "3d"), for its top-k;
        chunk_bytes: fp32 gate scores computed at once (`KernelOptions.gate_chunk_bytes`): scopes that
            never mix heads take the heads a few at a time; the picks do not depend on it.
    Returns:
        bool [B, H, R, C] (R = C*V slots at token granularity, C blocks at block granularity).
    """
    token = config.granularity == "token"
    row_valid = valid if token else torch.ones(layout.num_blocks, dtype=torch.bool, device=qb.device)
    rules = dict(
        selection=config.selection, scope=config.scope, threshold=config.threshold, topk=config.topk_for(kind)
    )
    rows_per_block = layout.padded_volume if token else 1

    # The block means once for all heads: per chunk they were ~15 more small launches, and the gate is
    # bound by launches once its kernels are fast (docs/notes/27-gate-and-list-kernels.md).
    k_mean = block_means(kb, layout.padded_volume, valid)

    def select_heads(heads: slice) -> torch.Tensor:
        scores = gate_scores(
            qb[:, :, heads], k_mean[:, :, heads], layout.padded_volume, valid, config.granularity
        )
        return select_from_scores(scores, row_valid, rows_per_block, **rules)

    B, _, H, _ = qb.shape
    per_head = B * row_valid.shape[0] * layout.num_blocks * 4
    step = H if config.scope not in ("query", "head") else max(1, min(H, chunk_bytes // per_head))
    if step == H:
        return select_heads(slice(None))
    sel = torch.empty(B, H, row_valid.shape[0], layout.num_blocks, dtype=torch.bool, device=qb.device)
    for start in range(0, H, step):
        sel[:, start : start + step] = select_heads(slice(start, start + step))
    return sel
