"""Periodic evaluation: validation loss at fixed timesteps and noise, plus VMoBA attention recall/density."""

import torch

from training.config import EvalConfig
from training.metrics import validation_loss
from training.objective import FlowMatching, ModelFn


def _mean_of(stats: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    values = {k: float(v) for k, v in stats.items() if k.startswith(prefix + "/layer_")}
    return {**values, f"{prefix}/mean": sum(values.values()) / len(values)} if values else {}


@torch.no_grad()
def evaluate(
    model_fn: ModelFn, objective: FlowMatching, controller, batches: list[dict], cfg: EvalConfig
) -> dict:
    """`{"val_loss", "recall/layer_XX", "recall/mean", "density/layer_XX", "density/mean"}` on `batches`
    (dicts with `latents [B, C, F, H, W]`, `text_emb [B, S, D]`, `text_mask [B, S]` on the model's device)."""
    result = {"val_loss": validation_loss(model_fn, objective, batches, cfg.timesteps, cfg.seed)}
    if cfg.recall:
        # One forward at mid-noise with recall on: each VMoBA layer compares its selection with dense.
        batch = batches[0]
        controller.measure_recall = True
        try:
            t = torch.full((batch["latents"].shape[0],), 0.5, device=batch["latents"].device)
            noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(cfg.seed))
            x_t = objective.interpolate(batch["latents"].float(), noise.to(batch["latents"].device), t)
            model_fn(x_t, t, batch)
        finally:
            controller.measure_recall = False
        stats = controller.stats()
        result |= _mean_of(stats, "recall") | _mean_of(stats, "density")
    return result
