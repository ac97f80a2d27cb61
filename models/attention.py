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

Which blocks, processor and grid a model has comes from its family (`models.families`). Under
`models.checkpointing.enable_checkpointing(model, keep_attention=True)` a kernel's output is kept through
the checkpoint by the model's `AttentionKeeper`.
"""

import torch
from diffusers.models.modeling_utils import ModelMixin

import vmoba
from models.checkpointing import AttentionKeeper, keeper_of
from models.config import AttentionConfig
from models.families import Grid, family_of


class AttentionController:
    """Per-model state shared by the installed processors (returned by `install_attention`).

    Attributes:
        cfg: the installed `AttentionConfig`.
        step: the denoising step passed to VMoBA (None in training; `set_denoising_step`).
        grid: token grid (T, H, W) of the current forward, set by the transformer's pre-hook.
        measure_recall: when True each layer also records `recall/layer_XX` (1 for full attention).
        recall_queries: how many query tokens `vmoba.attention_recall` samples per layer.
        keeper: the model's `AttentionKeeper` (attention kept through activation checkpointing).
    """

    def __init__(self, cfg: AttentionConfig, keeper: AttentionKeeper | None = None):
        self.cfg = cfg
        self.keeper = keeper or AttentionKeeper()
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


class LayerAttention:
    """One layer's attention kernel, as its processor calls it: `(q, k, v: [B, N, H, D], num_text) -> [B, N,
    H, D]`; subclasses implement `attend`. Inside a block checkpointed by `enable_checkpointing(...,
    keep_attention=True)`, the recompute reuses the forward's output (the controller's `keeper`)."""

    def __init__(self, controller: AttentionController, layer_idx: int):
        self.controller = controller
        self.layer_idx = layer_idx

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_text: int = 0) -> torch.Tensor:
        return self.controller.keeper.attend(self.layer_idx, self.attend, q, k, v, num_text)

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


def install_attention(model: ModelMixin, cfg: AttentionConfig) -> AttentionController:
    """Install full or VMoBA self-attention processors (per `cfg.type`) on every block of `model`.

    Re-installing replaces the processors and the grid hook in place (the weights are untouched), so
    one model switches between full and VMoBA attention. Returns the controller the processors share.
    """
    family = family_of(model)
    previous = getattr(model, "_attention_controller", None)
    if previous is not None:
        previous.remove()

    controller = AttentionController(cfg, keeper_of(model))
    kernel_cls = VMoBAAttention if cfg.type == "vmoba" else FullAttention
    for layer_idx, block in enumerate(family.blocks(model)):
        block.attn1.set_processor(family.processor(kernel_cls(controller, layer_idx)))

    def set_grid(module, args, kwargs):
        controller.grid = family.grid(module, args, kwargs)

    controller._hook = model.register_forward_pre_hook(set_grid, with_kwargs=True)
    model._attention_controller = controller
    return controller
