"""`vmoba_attention`: partition -> gate/selection -> block-sparse kernel -> unpartition; plus stats/recall."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fa4, keyed
from .config import VMoBAConfig
from .flash import flash_varlen_attention
from .gather import has_triton
from .partition import (
    BlockLayout,
    block_layout,
    partition_layout,
    token_slots,
    unpartition_layout,
    valid_mask,
)
from .reference import reference_attention
from .selection import block_means, gate_scores, select_from_scores
from .tiles import TILE

BACKENDS = ("auto", "reference", "flex", "fa4", "keyed", "flash_varlen")
TILED = ("flex", "fa4", "keyed")  # backends that need blocks padded to whole kernel tiles
OWN_ORDER = ("fa4", "keyed")  # backends that take raster q, k, v and the block order (`BlockOrder`)
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def _resolve_backend(backend: str, q: torch.Tensor, granularity: str) -> str:
    """The backend that runs this call. `auto` on CUDA: keyed for token granularity, fa4 for block
    granularity (the fastest at each: docs/benchmarks.md, notes 10 and 16), flex where those cannot run;
    reference on CPU."""
    if backend == "auto":
        # On CPU FlexAttention has no backward and compiles ~18 s per shape, which outweighs its
        # forward gain at the sizes a CPU handles (docs/benchmarks.md, "CPU: what auto picks").
        if not q.is_cuda:
            return "reference"
        if granularity == "token" and not keyed.unsupported(q):
            return "keyed"
        reason = fa4.unsupported(q)
        if reason == fa4.INSTALL_HINT:  # the GPU could run fa4: say what the fallback costs, once
            _warn_once(
                "vmoba: backend='auto' runs block granularity with flex because FlashAttention-4 is not "
                "installed; its kernels are 1.3-1.5x faster than flex's (docs/benchmarks.md). " + reason
            )
        return "flex" if reason else "fa4"
    if backend in OWN_ORDER:  # the kernels that check what they can run
        reason = {"fa4": fa4, "keyed": keyed}[backend].unsupported(q)
        if reason:
            raise (ImportError if reason == fa4.INSTALL_HINT else ValueError)(reason)
    return backend


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


# Bytes of fp32 gate scores computed at once. Token scores are [B, H, L, C] (1.1 GB at 55K tokens, 432
# blocks, 12 heads); scopes that never mix heads take them a few heads at a time instead.
GATE_CHUNK_BYTES = 1 << 28


def _select(qb, kb, layout: BlockLayout, valid, config: VMoBAConfig, kind: str) -> torch.Tensor:
    """bool [B, H, R, C] selection of block-order q, k (R = slots or blocks, per config.granularity)."""
    token = config.granularity == "token"
    row_valid = valid if token else torch.ones(layout.num_blocks, dtype=torch.bool, device=qb.device)
    rules = dict(
        selection=config.selection, scope=config.scope, threshold=config.threshold, topk=config.topk_for(kind)
    )
    rows_per_block = layout.padded_volume if token else 1

    # The block means once for all heads: per chunk they were ~15 more small launches, and the gate is
    # bound by launches once its kernels are fast (note 27).
    k_mean = block_means(kb, layout.padded_volume, valid)

    def select(heads: slice) -> torch.Tensor:
        scores = gate_scores(
            qb[:, :, heads], k_mean[:, :, heads], layout.padded_volume, valid, config.granularity
        )
        return select_from_scores(scores, row_valid, rows_per_block, **rules)

    B, _, H, _ = qb.shape
    per_head = B * row_valid.shape[0] * layout.num_blocks * 4
    step = H if config.scope not in ("query", "head") else max(1, min(H, GATE_CHUNK_BYTES // per_head))
    if step == H:
        return select(slice(None))
    sel = torch.empty(B, H, row_valid.shape[0], layout.num_blocks, dtype=torch.bool, device=qb.device)
    for start in range(0, H, step):
        sel[:, start : start + step] = select(slice(start, start + step))
    return sel


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


def _flex():
    """vmoba.flex, imported on first use: it pulls in torch._dynamo (~1.5 s at import)."""
    from . import flex

    return flex


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
) -> torch.Tensor:
    """VMoBA attention: each query attends to the union of its selected key blocks (docs/vmoba.md).

    Args:
        q, k, v: [B, S + L, H, D], bf16 / fp16 / fp32 (fp64 for tests): S = `num_prefix` tokens (e.g. the
            text of a joint-attention model), then L video tokens in raster order of `grid`.
        grid: (T, H, W) of the patchified latent, L == T*H*W.
        config: VMoBAConfig; layer_idx: picks the partition (1d/2d/3d cycle) and the dense first layers.
        backend: "auto" (CUDA: keyed for token granularity, fa4 for block granularity, where they run,
            else flex; CPU: reference) | "reference" | "flex" | "fa4" | "keyed" | "flash_varlen".
        step: denoising step index (None in training); dense while step < config.dense_first_steps.
        stats: optional dict, filled with detached per-head tensors: "density" [H] (1 in dense layers) and,
            in sparse layers, "blocks" [H] (see `selection_stats`; video tokens only).
        num_prefix: S >= 0. Prefix queries attend to every key; video queries attend to every prefix key
            plus their selected video blocks; the gate and the statistics see the video tokens only.
    Returns:
        [B, S + L, H, D] in q's dtype, video tokens in raster order; differentiable w.r.t. q, k and v
        (not the gate).
    """
    if not isinstance(num_prefix, int) or not 0 <= num_prefix < q.shape[1]:
        raise ValueError(f"num_prefix must be an int in [0, {q.shape[1]}), got {num_prefix!r}")
    _check_inputs(*(t[:, num_prefix:] for t in (q, k, v)), grid)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if config.is_dense(layer_idx, step):
        if stats is not None:
            stats["density"] = torch.ones(q.shape[2], device=q.device)
        return dense_attention(q, k, v)
    kind = config.partition_for_layer(layer_idx)
    backend = _resolve_backend(backend, q, config.granularity)
    layout = _layout(config, grid, layer_idx, TILE if backend in TILED else 1)
    valid = valid_mask(layout, q.device)
    order = BlockOrder(layout, num_prefix)
    # fa4 and keyed differentiate through raster q, k, v themselves, taking the block order outside
    # autograd (the row gather on CUDA); the other kernels get block-order tensors with autograd.
    with torch.set_grad_enabled(torch.is_grad_enabled() and backend not in OWN_ORDER):
        qb, kb, vb = (order.to_blocks(t) for t in (q, k, v))
    with torch.no_grad():  # the gate is discrete: no gradient flows through it
        sel = _select(qb[:, order.head :], kb[:, order.head :], layout, valid, config, kind)
    if stats is not None:
        stats.update(selection_stats(sel, layout, valid))
    if num_prefix:
        sel, valid = _joint_selection(sel, valid, order)
    if backend == "fa4":
        blocks = (qb, kb, vb)
        return fa4.fa4_block_attention(q, k, v, sel, layout.padded_volume, valid, order.padded, order, blocks)
    if backend == "keyed":
        return keyed.keyed_attention(q, k, v, sel, layout.padded_volume, valid, order, (qb, kb, vb))
    if backend == "flex":
        kernel = _flex().flex_block_attention
    else:
        kernel = {"reference": reference_attention, "flash_varlen": flash_varlen_attention}[backend]
    return order.from_blocks(kernel(qb, kb, vb, sel, layout.padded_volume, valid))


@dataclass(frozen=True)
class BlockOrder:
    """Raster order <-> block order of one call: `num_prefix` tokens (zero-padded to whole blocks, the first
    `head` slots), then the video's blocks (`partition_layout`)."""

    layout: BlockLayout
    num_prefix: int

    @property
    def head(self) -> int:
        """Slots before the video's blocks: the prefix rounded up to whole blocks."""
        return -(-self.num_prefix // self.layout.padded_volume) * self.layout.padded_volume

    @property
    def padded(self) -> bool:
        """Whether the block order holds padding slots (grid edges, block rounding or the prefix's block)."""
        return self.layout.length != self.layout.num_tokens or self.head != self.num_prefix

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S + L, ...] raster -> [B, head + C*V, ...] block order."""
        S = self.num_prefix
        video = partition_layout(x[:, S:], self.layout)
        if not S:
            return video
        pad = (0, 0) * (x.dim() - 2) + (0, self.head - S)
        return torch.cat([torch.nn.functional.pad(x[:, :S], pad), video], dim=1)

    def from_blocks(self, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of `to_blocks`: [B, head + C*V, ...] -> [B, S + L, ...] (padding dropped); with `out`
        (e.g. a head slice of a larger tensor), written there (see `unpartition_layout`)."""
        if out is not None:
            out[:, : self.num_prefix] = y[:, : self.num_prefix]
            unpartition_layout(y[:, self.head :], self.layout, out[:, self.num_prefix :])
            return out
        video = unpartition_layout(y[:, self.head :], self.layout)
        if not self.num_prefix:
            return video  # no concatenation (a full copy) without a prefix
        return torch.cat([y[:, : self.num_prefix], video], dim=1)


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
) -> torch.Tensor:
    """Fraction of the dense softmax mass that the selected blocks cover, per head.

    Args:
        q, k: [B, L, H, D] in raster order of `grid` (T, H, W); config, layer_idx: as in `vmoba_attention`.
        num_queries: queries sampled uniformly without replacement (all when >= L); generator: a CPU
            torch.Generator for the sample.
    Returns:
        fp32 [H]: mean over the batch and sampled queries of the attention probability mass inside the
        query's selected blocks; 1.0 when everything is selected.
    """
    _check_inputs(q, k, k, grid)
    layout = _layout(config, grid, layer_idx, 1)
    valid = valid_mask(layout, q.device)
    with torch.no_grad():
        qb, kb = (partition_layout(t, layout) for t in (q, k))
        sel = _select(qb, kb, layout, valid, config, config.partition_for_layer(layer_idx))
        picks = torch.randperm(layout.num_tokens, generator=generator)[:num_queries].to(q.device)
        slots = token_slots(layout, q.device)[picks].long()  # [n] block order of the sampled queries
        logits = torch.einsum("bnhd,bkhd->bhnk", qb[:, slots].float(), kb.float()) * q.shape[-1] ** -0.5
        probs = logits.masked_fill(~valid, -torch.inf).softmax(-1)  # [B, H, n, L]
        rows = slots if sel.shape[2] == layout.length else slots // layout.padded_volume
        key_block = torch.arange(layout.length, device=q.device) // layout.padded_volume
        covered = sel[:, :, rows][..., key_block]  # [B, H, n, L]
        return (probs * covered).sum(-1).mean((0, 2))
