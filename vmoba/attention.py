"""`vmoba_attention`: partition -> gate/selection -> block-sparse kernel -> unpartition; plus stats/recall.

The kernel is the registered backend's (`vmoba.backends`); the gate is `vmoba.selection.select`.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import keyed
from .backends import check_name, resolve
from .config import VMoBAConfig
from .gather import has_triton
from .options import DEFAULT_OPTIONS, KernelOptions
from .partition import BlockLayout, BlockOrder, block_layout, partition_layout, token_slots, valid_mask
from .selection import select

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _check_inputs(q, k, v, grid) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must all be [B, L, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    try:
        T, H, W = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be (T, H, W), got {grid!r}") from None
    if T * H * W != q.shape[1]:
        raise ValueError(f"grid {tuple(grid)} gives T*H*W = {T * H * W} tokens but L = {q.shape[1]}")


def _layout(config: VMoBAConfig, grid, layer_idx: int, pad_to: int) -> BlockLayout:
    kind = config.partition_for_layer(layer_idx)
    return block_layout(grid, kind, config.block_for(kind), pad_to)


@functools.cache  # once per (partition, grid, top-k): a forward calls it in every layer of that partition
def _warn_dense_topk(kind: str, grid: tuple[int, int, int], topk: int, num_blocks: int) -> None:
    """Warn that a top-k covering all `num_blocks` blocks of a layout selects everything: dense attention."""
    warnings.warn(
        f"vmoba: topk_{kind}={topk} >= the {num_blocks} blocks of the {kind} partition of the token grid "
        f"{grid}: every query selects every block, so these layers run dense attention (no sparsity); "
        f"lower topk_{kind} or block_{kind}",
        stacklevel=3,  # the caller of vmoba_attention
    )


def selection_stats(sel: torch.Tensor, layout: BlockLayout, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head statistics of a selection, on device, without host syncs.

    Args:
        sel: bool [B, H, R, C] (R = slots or blocks); layout, valid: its partition and bool [C*S] mask.
    Returns:
        {"density": [H] fraction of (valid query, valid key) pairs attended,
         "blocks": [H] mean selected blocks per valid query}.
    """
    counts = valid.view(layout.num_blocks, -1).sum(-1, dtype=torch.float32)  # valid tokens per block
    n = float(layout.num_tokens) * sel.shape[0]
    if sel.shape[2] == valid.shape[0]:  # token rows weigh 0 or 1: count them, without an fp32 copy of the
        # selection (1.1 GB at 55K tokens, and this runs in every sparse layer)
        per_block = _valid_rows_per_block(sel, valid).float()  # [B, H, C]
        blocks = per_block.sum((0, 2)) / n
    else:
        blocks = torch.einsum("bhr,r->h", sel.sum(-1, dtype=torch.float32), counts) / n
        per_block = torch.einsum("bhrc,r->bhc", sel.float(), counts)
    density = torch.einsum("bhc,c->h", per_block, counts) / (n * layout.num_tokens)
    return {"density": density.detach(), "blocks": blocks.detach()}


def _valid_rows_per_block(sel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, H, C]: the valid rows of a token selection sel bool [B, H, L, C] that picked each block."""
    if sel.is_cuda and has_triton():
        return keyed.column_counts(sel, valid)  # one pass; PyTorch's masked sum takes ~2 ms at 55K tokens
    return (sel & valid[:, None]).sum(2)


# cuDNN first, whatever a PyTorch version's default order: on an H100 at 55K tokens its fwd+bwd is 1.8x
# FlashAttention-2's (docs/benchmarks.md). Backends that cannot take an input fall through to the next.
_SDPA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """Full softmax attention through SDPA, fastest backend first.

    Args:
        q, k, v: [B, L, H, D]; mask: optional bool [B, H, L, L] (True = attend).
    Returns:
        [B, L, H, D].
    """
    with sdpa_kernel(_SDPA_PRIORITY, set_priority=True):
        out = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask
        )
    return out.transpose(1, 2)


def vmoba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid,
    config: VMoBAConfig,
    layer_idx: int = 0,
    backend: str = "auto",
    step: int | None = None,
    stats: dict | None = None,
    num_prefix: int = 0,
    options: KernelOptions | None = None,
) -> torch.Tensor:
    """VMoBA attention: each query attends to the union of its selected key blocks (docs/vmoba.md).

    Args:
        q, k, v: [B, S + L, H, D], bf16 / fp16 / fp32 (fp64 for tests): S = `num_prefix` tokens (e.g. the
            text of a joint-attention model), then L video tokens in raster order of `grid`.
        grid: (T, H, W) of the patchified latent, L == T*H*W.
        config: VMoBAConfig; layer_idx: picks the partition (1d/2d/3d cycle) and the dense first layers.
        backend: "auto" (CUDA: keyed for token granularity, fa4 for block granularity, where they run,
            else flex; CPU: reference) | "reference" | "flex" | "fa4" | "keyed" | "flash_varlen" | any
            other registered name (`vmoba.BACKENDS`, `vmoba.backends.register`).
        step: denoising step index (None in training); dense while step < config.dense_first_steps.
        stats: optional dict, filled with detached per-head tensors: "density" [H] (1 in dense layers) and,
            in sparse layers, "blocks" [H] (see `selection_stats`; video tokens only).
        num_prefix: S >= 0. Prefix queries attend to every key; video queries attend to every prefix key
            plus their selected video blocks; the gate and the statistics see the video tokens only.
        options: `KernelOptions` (tuning knobs: speed and memory, not the result); None: the defaults.
    Returns:
        [B, S + L, H, D] in q's dtype, video tokens in raster order; differentiable w.r.t. q, k and v
        (not the gate).
    """
    if not isinstance(num_prefix, int) or not 0 <= num_prefix < q.shape[1]:
        raise ValueError(f"num_prefix must be an int in [0, {q.shape[1]}), got {num_prefix!r}")
    _check_inputs(*(t[:, num_prefix:] for t in (q, k, v)), grid)
    check_name(backend)
    if config.is_dense(layer_idx, step):
        if stats is not None:
            stats["density"] = torch.ones(q.shape[2], device=q.device)
        return dense_attention(q, k, v)
    options = DEFAULT_OPTIONS if options is None else options
    kind = config.partition_for_layer(layer_idx)
    runner = resolve(backend, q, config.granularity)
    layout = _layout(config, grid, layer_idx, runner.pad_to)
    if config.selection == "topk" and config.topk_for(kind) >= layout.num_blocks:
        _warn_dense_topk(kind, layout.grid, config.topk_for(kind), layout.num_blocks)
    valid = valid_mask(layout, q.device)
    order = BlockOrder(layout, num_prefix)
    # Raster backends (fa4, keyed) differentiate through raster q, k, v themselves, taking the block order
    # outside autograd (the row gather on CUDA); the others get block-order tensors with autograd.
    with torch.set_grad_enabled(torch.is_grad_enabled() and runner.consumes == "blocks"):
        blocks = tuple(order.to_blocks(t) for t in (q, k, v))
    with torch.no_grad():  # the gate is discrete: no gradient flows through it
        qb, kb = (t[:, order.head :] for t in blocks[:2])
        sel = select(qb, kb, layout, valid, config, kind, options.gate_chunk_bytes)
    if stats is not None:
        stats.update(selection_stats(sel, layout, valid))
    if num_prefix:
        sel, valid = _joint_selection(sel, valid, order)
    return runner.attend(q, k, v, sel, valid, order, blocks=blocks, options=options)


def _joint_selection(sel: torch.Tensor, valid: torch.Tensor, order: BlockOrder):
    """The selection with the prefix as extra blocks in front: every row selects them, and their rows
    select every block, so the kernels need no special case.

    Args:
        sel: bool [B, H, R, C] of the video (R = C*V or C); valid: bool [C*V]; order: with S prefix tokens.
    Returns:
        sel bool [B, H, P*V + R or P + R, P + C] with P = head / V prefix blocks; valid bool [(P + C)*V].
    """
    (B, H, R, C), V = sel.shape, order.layout.padded_volume
    P = order.head // V
    head_valid = torch.arange(order.head, device=valid.device) < order.num_prefix
    rows = order.head if R == valid.shape[0] else P  # token or block granularity
    joint = sel.new_ones(B, H, rows + R, P + C)
    joint[:, :, rows:, P:] = sel
    return joint, torch.cat([head_valid, valid])


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    grid,
    config: VMoBAConfig,
    layer_idx: int = 0,
    num_queries: int = 256,
    generator: torch.Generator | None = None,
    options: KernelOptions | None = None,
) -> torch.Tensor:
    """Fraction of the dense softmax mass that the selected blocks cover, per head.

    Args:
        q, k: [B, L, H, D] in raster order of `grid` (T, H, W); config, layer_idx: as in `vmoba_attention`.
        num_queries: queries sampled uniformly without replacement (all when >= L); generator: a CPU
            torch.Generator for the sample; options: its `gate_chunk_bytes` applies.
    Returns:
        fp32 [H]: mean over the batch and sampled queries of the attention probability mass inside the
        query's selected blocks; 1.0 when everything is selected.
    """
    _check_inputs(q, k, k, grid)
    layout = _layout(config, grid, layer_idx, 1)
    valid = valid_mask(layout, q.device)
    with torch.no_grad():
        qb, kb = (partition_layout(t, layout) for t in (q, k))
        chunk = (DEFAULT_OPTIONS if options is None else options).gate_chunk_bytes
        sel = select(qb, kb, layout, valid, config, config.partition_for_layer(layer_idx), chunk)
        picks = torch.randperm(layout.num_tokens, generator=generator)[:num_queries].to(q.device)
        slots = token_slots(layout, q.device)[picks].long()  # [n] block order of the sampled queries
        logits = torch.einsum("bnhd,bkhd->bhnk", qb[:, slots].float(), kb.float()) * q.shape[-1] ** -0.5
        probs = logits.masked_fill(~valid, -torch.inf).softmax(-1)  # [B, H, n, L]
        rows = slots if sel.shape[2] == layout.length else slots // layout.padded_volume
        key_block = torch.arange(layout.length, device=q.device) // layout.padded_volume
        covered = sel[:, :, rows][..., key_block]  # [B, H, n, L]
        return (probs * covered).sum(-1).mean((0, 2))
