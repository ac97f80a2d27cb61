"""Adapt a diffusers video transformer to the objective's `model_fn(x_t, t, cond) -> velocity` contract."""

import torch

from models.families import get_family
from training.objective import ModelFn


def make_model_fn(module, family: str, num_train_timesteps: int, dtype: torch.dtype) -> ModelFn:
    """`module` is the transformer or the DeepSpeed engine wrapping it; `family` its `model.family` (the
    family's `call` adapts the layout, `models.families`); `dtype` its compute dtype.

    The returned function takes `x_t [B, C, F, H, W]`, flow time `t [B]` in [0, 1] and
    `cond = {"text_emb": [B, S, D], "text_mask": [B, S]}` (padding already zeroed by the text encoder) and
    returns the velocity `[B, C, F, H, W]` in float32. The transformer sees `t * num_train_timesteps`.
    """
    call = get_family(family).call

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        out = call(module, x_t.to(dtype), t * num_train_timesteps, cond["text_emb"].to(dtype))
        return out.float()

    return model_fn
