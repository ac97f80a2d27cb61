"""The training loop's metrics: validation loss at fixed timesteps and noise, and VMoBA attention
recall/density per layer and partition type. `training.evaluation.evaluate` combines them every
`eval.every` steps; `scripts/evaluate.py` runs the same on a checkpoint.

Sample-fidelity metrics between two runs (PSNR, SSIM, LPIPS, FVD, CLIP score) are in `evaluation.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

DEFAULT_VAL_TIMESTEPS = (0.25, 0.5, 0.75)  # as configs/train.yaml's eval.timesteps
PARTITION_CYCLE = ("1d", "2d", "3d")


# ----------------------------------------------------------------------------- validation loss


@torch.no_grad()
def validation_loss(
    model_fn: Callable[..., torch.Tensor],
    objective: Any,
    batches: Iterable[dict[str, Any]],
    timesteps: Sequence[float] = DEFAULT_VAL_TIMESTEPS,
    seed: int = 0,
) -> float:
    """Flow-matching loss on held-out clips at fixed timesteps and fixed noise (deterministic).

    Args:
        model_fn: `model_fn(x_t [B, C, F, H, W], t [B], cond) -> prediction [B, C, F, H, W]`.
        objective: a `training.objective.FlowMatching` (its `loss(model_fn, latents, cond, t=, noise=)`).
        batches: the validation batches, the same ones at every call (e.g. a list, or a dataloader
            built with a fixed seed and no shuffling): dicts with `latents [B, C, F, H, W]`; every other
            tensor entry (`text_emb [B, S, D]`, `text_mask [B, S]`, ...) is passed on as `cond`.
        timesteps: the times in (0, 1) at which every clip is evaluated.
        seed: noise for (batch i, timestep j) comes from a generator seeded with `seed`, `i`, `j`, so two
            runs (or two evaluations of one run) see identical noise and their losses compare step by step.

    Returns:
        The loss averaged over clips and timesteps (each clip weighs the same).
    """
    if not timesteps:
        raise ValueError("validation_loss: `timesteps` is empty; give at least one time in (0, 1)")
    total, count = None, 0
    for i, batch in enumerate(batches):
        if "latents" not in batch:
            raise KeyError(f"validation_loss: batch {i} has no 'latents' (keys: {sorted(batch)})")
        latents = batch["latents"]
        cond = {k: v for k, v in batch.items() if k != "latents" and isinstance(v, torch.Tensor)}
        for j, t_value in enumerate(timesteps):
            # Noise is drawn in float32 on the CPU so it is identical across devices and cache dtypes.
            gen = torch.Generator().manual_seed(_mix_seed(seed, i, j))
            noise = torch.randn(latents.shape, generator=gen).to(latents.device)
            t = torch.full((latents.shape[0],), float(t_value), device=latents.device)
            loss = objective.loss(model_fn, latents, cond, t=t, noise=noise).detach() * latents.shape[0]
            total = loss if total is None else total + loss  # summed on the device: one sync at the end
            count += latents.shape[0]
    if total is None:
        raise ValueError("validation_loss: `batches` yielded nothing; is the validation split empty?")
    return float(total) / count


def _mix_seed(seed: int, i: int, j: int) -> int:
    return (seed * 1_000_003 + i * 10_007 + j) % (2**63)


# ----------------------------------------------------------------------------- attention recall


@torch.no_grad()
def attention_recall_per_layer(
    controller: Any, run_forward: Callable[[], Any], cycle: Sequence[str] = PARTITION_CYCLE
) -> dict[str, float]:
    """Measures VMoBA's attention recall and density per layer and per partition type.

    Recall is the fraction of dense softmax mass that the selected blocks cover (estimated by each
    layer on a sample of queries); density the fraction of key blocks attended.

    Args:
        controller: the `AttentionController` returned by `models.attention.install_attention`; its
            `.measure_recall` flag is set for the one forward and restored afterwards.
        run_forward: runs one forward pass of the model (e.g. on a validation batch).
        cycle: partition type of layer `i` is `cycle[i % len(cycle)]` (the config's partition cycle).

    Returns:
        `{"recall/layer_XX", "density/layer_XX", "recall/<type>", "density/<type>", "recall/mean",
        "density/mean"}` as floats; per-type and mean entries average the layers (each layer's value
        is itself a mean over heads). Full-attention layers report 1 for both.
    """
    previous = controller.measure_recall
    controller.measure_recall = True
    try:
        run_forward()
        stats = controller.stats()
    finally:
        controller.measure_recall = previous
    return summarize_layer_stats(stats, cycle)


def summarize_layer_stats(stats: dict[str, Any], cycle: Sequence[str] = PARTITION_CYCLE) -> dict[str, float]:
    """Reduces `{"recall/layer_XX": tensor [H] or float, "density/layer_XX": ...}` to floats per layer,
    per partition type (layer `i` has type `cycle[i % len(cycle)]`) and overall; other keys are ignored."""
    out: dict[str, float] = {}
    for kind in ("recall", "density"):
        per_type: dict[str, list[float]] = {}
        layers = sorted(k for k in stats if k.startswith(f"{kind}/layer_"))
        for key in layers:
            value = stats[key]
            value = float(value.float().mean()) if isinstance(value, torch.Tensor) else float(value)
            out[key] = value
            layer = int(key.rsplit("_", 1)[1])
            per_type.setdefault(cycle[layer % len(cycle)], []).append(value)
        for name, values in per_type.items():
            out[f"{kind}/{name}"] = sum(values) / len(values)
        if layers:
            out[f"{kind}/mean"] = sum(out[k] for k in layers) / len(layers)
    return out
