"""Periodic evaluation: validation loss at fixed timesteps and noise, plus VMoBA attention recall/density.

The one place the evaluation is defined: `train.py` runs it every `eval.every` steps and `scripts/evaluate.py`
runs it on a checkpoint, so the script reproduces the run's `eval.jsonl` record at that step."""

import torch

from training.config import EvalConfig
from training.metrics import attention_recall_per_layer, validation_loss
from training.objective import FlowMatching, ModelFn


@torch.no_grad()
def evaluate(
    model_fn: ModelFn, objective: FlowMatching, controller, batches: list[dict], cfg: EvalConfig
) -> dict[str, float]:
    """`{"val_loss", "recall/layer_XX", "recall/<type>", "recall/mean", "density/...` (likewise)}` on
    `batches` (dicts with `latents [B, C, F, H, W]`, `text_emb [B, S, D]`, `text_mask [B, S]` on the
    model's device); the recall/density entries only with `cfg.recall`. `controller` is the
    `AttentionController` of the model behind `model_fn`; its config's partition cycle types the layers."""
    result = {"val_loss": validation_loss(model_fn, objective, batches, cfg.timesteps, cfg.seed)}
    if cfg.recall:
        # One forward at mid-noise (t = 0.5) on the first batch, with noise from `cfg.seed` drawn on the CPU
        # (the same on every device): each VMoBA layer compares its selection with dense attention.
        latents = batches[0]["latents"]
        t = torch.full((latents.shape[0],), 0.5, device=latents.device)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(cfg.seed))
        x_t = objective.interpolate(latents.float(), noise.to(latents.device), t)
        result |= attention_recall_per_layer(
            controller, lambda: model_fn(x_t, t, batches[0]), controller.cfg.partitions
        )
    return result
