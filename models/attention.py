"""Attention processors that run full (SDPA) or VMoBA attention inside diffusers video DiTs.

diffusers' attention-backend registry is a closed enum, so VMoBA plugs in as a *processor* on each
block's self-attention (`attn1`); Wan's cross-attention (`attn2`) is untouched. A processor reproduces
the model's own processor (projections, q/k norms, RoPE, output projection) and hands `q, k, v` to a
*kernel* bound to its layer:

- `FullAttention`: dense SDPA (`vmoba.dense_attention`: cuDNN first, the fastest on Hopper) -- the baseline;
- `VMoBAAttention`: `vmoba.vmoba_attention` on the latent token grid.

Processors and kernels own no parameters, so one checkpoint loads and trains with either attention.
Processors do not receive the latent shape, so `install_attention` adds a forward pre-hook on the
transformer that sets the token grid `(F/pt, H/ph, W/pw)` on the controller at every forward. VMoBA's
selection is a deterministic function of `q, k`, so activation checkpointing recomputes the same mask.

With activation checkpointing every block's forward runs twice, and attention is most of a block's forward
at long sequences. `enable_checkpointing(model, keep_attention=True)` keeps each block's attention output
and the tensors its backward needs through the checkpoint (memory for speed, docs/training.md), so the
recompute takes the kept output instead of running the kernel again.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_wan import WanAttention, _get_qkv_projections

import vmoba
from models.cogvideox import CogVideoXSelfAttnProcessor, cogvideox_grid
from models.config import AttentionConfig
from models.wan_block import fused_on_cuda

Grid = tuple[int, int, int]


class AttentionController:
    """Per-model state shared by the installed processors (returned by `install_attention`).

    Attributes:
        cfg: the installed `AttentionConfig`.
        step: the denoising step passed to VMoBA (None in training; `set_denoising_step`).
        grid: token grid (T, H, W) of the current forward, set by the transformer's pre-hook.
        measure_recall: when True each layer also records `recall/layer_XX` (1 for full attention).
        recall_queries: how many query tokens `vmoba.attention_recall` samples per layer.
    """

    def __init__(self, cfg: AttentionConfig):
        self.cfg = cfg
        self.step: int | None = None
        self.grid: Grid | None = None
        self.measure_recall = False
        self.recall_queries = 64
        self._stats: dict[str, torch.Tensor] = {}
        self._hook = None

    def set_denoising_step(self, step: int | None) -> None:
        """Set the sampling step (VMoBA runs dense for `step < dense_first_steps`); None for training."""
        self.step = step

    def stats(self) -> dict[str, torch.Tensor]:
        """Latest per-layer statistics, e.g. `{"density/layer_00": tensor(0.31), "recall/layer_00": ...}`.

        Scalar float tensors, detached and still on the model's device: nothing syncs until the caller
        reads them (`.item()`/`float()` at logging time).
        """
        return dict(self._stats)

    def record(self, layer_idx: int, name: str, value: torch.Tensor) -> None:
        """Store `value` (any shape; reduced to its mean) as `<name>/layer_<idx>`."""
        self._stats[f"{name}/layer_{layer_idx:02d}"] = value.detach().float().mean()

    def remove(self) -> None:
        """Detach the grid hook (processors stay until the next `install_attention`)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


# The attention outputs kept by the block that `enable_checkpointing(keep_attention=True)` is running (its
# forward or its recompute), by layer; None outside such a block or in one that keeps nothing.
_kept: dict[int, torch.Tensor] | None = None


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def enable_checkpointing(
    model: ModelMixin, keep_attention: bool = False, keep_blocks: int | None = None
) -> None:
    """diffusers' activation checkpointing of every transformer block (non-reentrant `torch.utils.checkpoint`).

    With `keep_attention`, each block call gets a dict of its own, live while the checkpoint's graph is:
    in the block's forward every `LayerAttention` runs its kernel under saved-tensor hooks of its own (so
    the checkpoint neither drops nor counts what the kernel saves for its backward) and keeps the output
    there; the checkpoint's recompute, which runs the same block call again, takes the kept output instead
    of running the kernel. Costs the kept tensors (at 55K tokens 0.6-0.85 GB per Wan-1.3B block), so
    `keep_blocks` limits it to the model's first that many blocks (None: every block); the others are
    checkpointed plainly. `keep_blocks` needs a model `install_attention` supports.
    """
    if keep_blocks is not None and keep_blocks < 0:
        raise ValueError(
            f"enable_checkpointing: keep_blocks must be >= 0 or None (every block), got {keep_blocks}"
        )
    if not keep_attention:
        model.enable_gradient_checkpointing()
        return
    keep = None if keep_blocks is None else set(_family(model).blocks(model)[:keep_blocks])

    def checkpoint(block, *args):
        # None for the blocks that keep nothing: their attention runs as under plain checkpointing.
        kept = {} if keep is None or block in keep else None

        def run(*inputs):
            global _kept
            outer, _kept = _kept, kept
            try:
                return block(*inputs)
            finally:
                _kept = outer

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)


class LayerAttention:
    """One layer's attention kernel, as its processor calls it: `(q, k, v: [B, N, H, D], num_text) -> [B, N,
    H, D]`; subclasses implement `attend`. Inside a block checkpointed by `enable_checkpointing(...,
    keep_attention=True)`, the recompute reuses the forward's output."""

    def __init__(self, controller: AttentionController, layer_idx: int):
        self.controller = controller
        self.layer_idx = layer_idx

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_text: int = 0) -> torch.Tensor:
        kept = _kept
        if kept is None or not torch.is_grad_enabled():
            return self.attend(q, k, v, num_text)
        if self.layer_idx in kept:  # the recompute
            return kept.pop(self.layer_idx)
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            out = self.attend(q, k, v, num_text)
        kept[self.layer_idx] = out
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_text: int) -> torch.Tensor:
        raise NotImplementedError


class FullAttention(LayerAttention):
    """Dense softmax attention of one layer."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_text: int) -> torch.Tensor:
        one = torch.ones((), device=q.device)
        self.controller.record(self.layer_idx, "density", one)
        if self.controller.measure_recall:
            self.controller.record(self.layer_idx, "recall", one)
        return vmoba.dense_attention(q, k, v)


class VMoBAAttention(LayerAttention):
    """VMoBA attention of one layer on the controller's token grid.

    `q, k, v: [B, S + L, H, D]` with `S = num_text` text tokens first and `L = T*H*W` video tokens in
    raster order; returns `[B, S + L, H, D]`: `vmoba.vmoba_attention` with the text as its prefix. With text
    (joint-attention models): text queries attend densely to every key; video queries attend to every text
    key plus the video blocks VMoBA selects from the video tokens alone.
    """

    def __init__(self, controller: AttentionController, layer_idx: int):
        super().__init__(controller, layer_idx)
        self.vmoba_cfg = controller.cfg.to_vmoba()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_text: int) -> torch.Tensor:
        ctrl, grid, cfg = self.controller, self.controller.grid, self.vmoba_cfg
        if grid is None:
            raise RuntimeError("VMoBA attention called outside a transformer forward: no token grid was set")
        stats: dict[str, torch.Tensor] = {}
        out = vmoba.vmoba_attention(
            q,
            k,
            v,
            grid,
            cfg,
            layer_idx=self.layer_idx,
            backend=ctrl.cfg.backend,
            step=ctrl.step,
            stats=stats,
            num_prefix=num_text,
        )
        for name, value in stats.items():
            ctrl.record(self.layer_idx, name, value)
        if ctrl.measure_recall:
            ctrl.record(self.layer_idx, "recall", self._recall(q[:, num_text:], k[:, num_text:], grid))
        return out

    @torch.no_grad()
    def _recall(self, qv: torch.Tensor, kv: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Softmax mass the selection covers, [H] (1 where this layer/step runs dense). The query sample
        comes from a per-layer seeded generator: repeatable, and the global RNG stays untouched."""
        if self.vmoba_cfg.is_dense(self.layer_idx, self.controller.step):
            return torch.ones((), device=qv.device)
        generator = torch.Generator().manual_seed(self.layer_idx)
        n = self.controller.recall_queries
        return vmoba.attention_recall(qv, kv, grid, self.vmoba_cfg, self.layer_idx, n, generator=generator)


def _wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs: x [B, L, H, D], freqs [1, L, 1, D] -> [B, L, H, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


# Eagerly, RoPE is ~8 fp32 elementwise kernels per tensor: 4.1 ms forward+backward for one
# [1, 55296, 12, 128] bf16 tensor on an H100, ~0.37 s of a Wan-2.1-1.3B training step (q and k, 30
# layers, forward + checkpoint recompute + backward). Inductor fuses it into one kernel each way (0.54 ms).
def wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """`_wan_rope`, compiled into one fused kernel on CUDA."""
    return fused_on_cuda(_wan_rope, x)(x, freqs_cos, freqs_sin)


class WanSelfAttnProcessor:
    """diffusers' `WanAttnProcessor` for self-attention, with the attention call replaced by `kernel`."""

    def __init__(self, kernel: FullAttention | VMoBAAttention):
        self.kernel = kernel

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden_states: [B, L, C] video tokens in raster order -> [B, L, C]."""
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanSelfAttnProcessor is for self-attention (attn1): no context, no mask")
        q, k, v = _get_qkv_projections(attn, hidden_states, None)  # (B, L, H*D) each
        q, k = attn.norm_q(q), attn.norm_k(k)  # RMS norm across heads, as Wan does
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))  # (B, L, H, D)
        if rotary_emb is not None:
            q, k = wan_rope(q, *rotary_emb), wan_rope(k, *rotary_emb)
        out = self.kernel(q, k, v).flatten(2, 3).type_as(q)  # (B, L, H*D)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_grid(model: WanTransformer3DModel, hidden_states: torch.Tensor) -> Grid:
    """Token grid (T, H, W) of Wan latents `hidden_states: [B, C, F, H, W]`."""
    p_t, p_h, p_w = model.config.patch_size
    _, _, frames, height, width = hidden_states.shape
    return frames // p_t, height // p_h, width // p_w


class _Family(NamedTuple):
    """How a model family exposes its transformer blocks (in layer order, each with its self-attention as
    `attn1`), its token grid and its self-attention processor."""

    blocks: Callable[[ModelMixin], torch.nn.ModuleList]
    grid: Callable[[ModelMixin, torch.Tensor], Grid]
    processor: type


_FAMILIES: dict[type, _Family] = {
    WanTransformer3DModel: _Family(lambda m: m.blocks, _wan_grid, WanSelfAttnProcessor),
    CogVideoXTransformer3DModel: _Family(
        lambda m: m.transformer_blocks, cogvideox_grid, CogVideoXSelfAttnProcessor
    ),
}


def _family(model: ModelMixin) -> _Family:
    family = _FAMILIES.get(type(model))
    if family is None:
        raise TypeError(
            f"unsupported model {type(model).__name__}; supported: {[cls.__name__ for cls in _FAMILIES]}"
        )
    return family


def install_attention(model: ModelMixin, cfg: AttentionConfig) -> AttentionController:
    """Install full or VMoBA self-attention processors (per `cfg.type`) on every block of `model`.

    Re-installing replaces the processors and the grid hook in place (the weights are untouched), so
    one model switches between full and VMoBA attention. Returns the controller the processors share.
    """
    family = _family(model)
    previous = getattr(model, "_attention_controller", None)
    if previous is not None:
        previous.remove()

    controller = AttentionController(cfg)
    kernel_cls = VMoBAAttention if cfg.type == "vmoba" else FullAttention
    for layer_idx, block in enumerate(family.blocks(model)):
        block.attn1.set_processor(family.processor(kernel_cls(controller, layer_idx)))

    def set_grid(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        controller.grid = family.grid(module, hidden_states)

    controller._hook = model.register_forward_pre_hook(set_grid, with_kwargs=True)
    model._attention_controller = controller
    return controller
