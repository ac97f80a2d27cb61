"""Adapt a diffusers video transformer to the objective's `model_fn(x_t, t, cond) -> velocity` contract."""

import torch

from training.objective import ModelFn


def make_model_fn(module, family: str, num_train_timesteps: int, dtype: torch.dtype) -> ModelFn:
    """`module` is the transformer or the DeepSpeed engine wrapping it; `dtype` its compute dtype.

    The returned function takes `x_t [B, C, F, H, W]`, flow time `t [B]` in [0, 1] and
    `cond = {"text_emb": [B, S, D], "text_mask": [B, S]}` (padding already zeroed by the text encoder) and
    returns the velocity `[B, C, F, H, W]` in float32. The transformer sees `t * num_train_timesteps`.
    """
    if family not in ("wan", "cogvideox"):
        raise ValueError(f"model.family={family!r}: no model_fn adapter; supported: ['wan', 'cogvideox']")

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        x = x_t.to(dtype)
        timestep = t * num_train_timesteps
        text = cond["text_emb"].to(dtype)
        if family == "wan":
            out = module(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        else:  # CogVideoX takes and returns [B, F, C, H, W]
            out = module(
                hidden_states=x.transpose(1, 2),
                encoder_hidden_states=text,
                timestep=timestep,
                return_dict=False,
            )[0].transpose(1, 2)
        return out.float()

    return model_fn
