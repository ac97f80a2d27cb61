"""The `flash_varlen` backend: the original MoBA/VMoBA approach through flash-attn's public varlen API.

Every (head, key block) becomes one varlen segment: the queries that selected the block attend to its
valid keys, giving a partial output and log-sum-exp per (query, block) pair; the pairs of a query are
merged by their log-sum-exps. `flash_attn_varlen_func` does not differentiate its returned lse, so
`_SegmentLse` adds that gradient (d lse / d q = scale * softmax-weighted key mean, d lse / d k_j =
scale * p_j * q), computed with two more public calls. Pair lists come from `nonzero`: this backend syncs
with the host once per call, like the original; `flex` does not.
"""

from __future__ import annotations

import torch

INSTALL_HINT = (
    "the flash_varlen backend needs flash-attn: pip install flash-attn --no-build-isolation "
    "(or pip install 'vmoba[flash]'); or use backend='flex'"
)
_LOW_PRECISION = (torch.float16, torch.bfloat16)  # the dtypes flash-attn accepts


def _flash_varlen_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return flash_attn_varlen_func


class _SegmentLse(torch.autograd.Function):
    """Identity on the per-pair lse [P] whose backward adds the lse's gradient w.r.t. q [P, 1, D], k [N, 1, D]."""

    @staticmethod
    def forward(ctx, lse, q, k, segments):
        ctx.save_for_backward(q, k)
        ctx.segments = segments
        return lse.clone()

    @staticmethod
    def backward(ctx, grad_lse):
        q, k = ctx.saved_tensors
        acc = torch.promote_types(q.dtype, torch.float32)
        (cu_q, cu_k, max_q, max_k), scale, attend = ctx.segments
        with torch.enable_grad():
            k_as_v = k.detach().requires_grad_()
            k_mean = attend(q.detach(), k.detach(), k_as_v, cu_q, cu_k, max_q, max_k, softmax_scale=scale)
            weight = (grad_lse.to(acc) * scale)[:, None, None]
            (dk,) = torch.autograd.grad(k_mean, k_as_v, (weight * q.to(acc)).to(q.dtype))
        dq = (weight * k_mean.detach().to(acc)).to(q.dtype)
        return None, dq, dk, None


def flash_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    block_slots: int,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Block-sparse attention through `flash_attn.flash_attn_varlen_func`.

    Args:
        q, k, v: [B, L, H, D] fp16/bf16 in block order, L = C * block_slots.
        sel: bool [B, H, R, C], R = L (token granularity) or C (block granularity); valid: bool [L].
    Returns:
        [B, L, H, D] in q's dtype (zeros at padded query slots).
    """
    attend = _flash_varlen_func()
    if q.dtype not in _LOW_PRECISION:
        raise ValueError(f"flash_varlen needs fp16 or bf16 q, k, v, got {q.dtype}; use backend='reference'")
    B, L, H, D = q.shape
    C, scale = L // block_slots, D**-0.5
    rows = sel if sel.shape[2] == L else sel.repeat_interleave(block_slots, dim=2)
    rows = rows & valid[:, None]  # padded queries attend nothing; their output slots stay zero
    # Pairs sorted by (b, h, c, query): consecutive pairs of one (b, h, c) form one varlen segment.
    b, h, c, i = rows.permute(0, 1, 3, 2).nonzero(as_tuple=True)
    q_pairs = q.permute(0, 2, 1, 3)[b, h, i].unsqueeze(1)  # [P, 1, D]
    key_slots = valid.nonzero(as_tuple=True)[0]  # valid keys, still grouped by block
    k_seg, v_seg = (t.permute(0, 2, 1, 3)[:, :, key_slots].reshape(-1, 1, D) for t in (k, v))
    q_counts = rows.sum(2).flatten()  # [B*H*C]
    k_counts = valid.view(C, block_slots).sum(-1).repeat(B * H)
    cu_q, cu_k = (torch.nn.functional.pad(n.cumsum(0), (1, 0)).to(torch.int32) for n in (q_counts, k_counts))
    segments = (cu_q, cu_k, int(q_counts.max()), block_slots)
    out, lse, _ = attend(q_pairs, k_seg, v_seg, *segments, softmax_scale=scale, return_attn_probs=True)
    lse = _SegmentLse.apply(lse[0], q_pairs, k_seg, (segments, scale, attend))
    # Merge the pairs of each query row by their log-sum-exp (in fp32 or better).
    acc = torch.promote_types(q.dtype, torch.float32)
    lse, row = lse.to(acc), (b * H + h) * L + i
    peak = torch.full((B * H * L,), -torch.inf, dtype=acc, device=q.device)
    peak = peak.scatter_reduce(0, row, lse.detach(), "amax")
    weight = torch.exp(lse - peak[row])
    weight = weight / torch.zeros_like(peak).index_add(0, row, weight)[row]
    merged = torch.zeros(B * H * L, D, dtype=acc, device=q.device)
    merged = merged.index_add(0, row, weight[:, None] * out[:, 0].to(acc))
    return merged.view(B, H, L, D).permute(0, 2, 1, 3).to(q.dtype)
