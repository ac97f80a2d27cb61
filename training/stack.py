"""The model stack, built in one place for `train.py`, `sample.py` and `scripts/evaluate.py`: the diffusion
transformer with its attention installed, the VAE and text encoder, and the `model_fn` adapter."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from models.attention import AttentionController, install_attention
from models.checkpointing import enable_checkpointing
from models.config import AttentionConfig, ModelConfig
from models.encoders import build_text_encoder, build_vae
from models.lora import apply_lora
from models.transformer import build_transformer
from training.config import ObjectiveConfig, TrainLoopConfig
from training.engine import use_bf16
from training.model_fn import make_model_fn
from training.objective import ModelFn


@dataclass
class ModelStack:
    """What `build_stack` returns. `dtype` is the compute dtype `model_fn` casts its inputs to;
    `text_encoder` and `vae` are None when built without encoders (a caller may drop the text encoder
    once its prompts are embedded, to free its memory)."""

    transformer: torch.nn.Module
    controller: AttentionController
    dtype: torch.dtype
    family: str
    num_train_timesteps: int
    text_encoder: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None

    def model_fn(self, module: torch.nn.Module | None = None) -> ModelFn:
        """`model_fn(x_t, t, cond) -> velocity` (training.model_fn) calling `module`: the transformer by
        default, or the DeepSpeed engine that wraps it (its forward runs the transformer under ZeRO)."""
        module = self.transformer if module is None else module
        return make_model_fn(module, self.family, self.num_train_timesteps, self.dtype)


def build_stack(
    model: ModelConfig,
    attention: AttentionConfig,
    objective: ObjectiveConfig,
    device: torch.device,
    *,
    precision: str,
    weights: str | Path | None = None,
    train: TrainLoopConfig | None = None,
    keep_fp32_modules: bool = False,
    encoders: bool = True,
) -> ModelStack:
    """Build the transformer of `model.transformer` (or the diffusers folder `weights`, e.g. a checkpoint's
    `transformer/` export) with `attention` installed, and the VAE and text encoder (on `device`, unless
    `encoders=False`).

    With `train` (the `train` config node) the transformer stays on the CPU in `model.transformer.dtype`
    and in train mode, with activation checkpointing as `train` asks and, with `train.lora.rank > 0`, frozen
    under LoRA adapters (`models.lora`): the DeepSpeed engine moves and casts it. Otherwise it goes to
    `device` in eval mode, in the compute dtype of `precision`: every parameter cast to it (as the DeepSpeed
    engine trains it, so an evaluation reproduces the trainer's numbers), or with `keep_fp32_modules`
    loaded in it, where diffusers keeps a pretrained model's fp32-sensitive
    modules (norms, time embedding) in fp32, as sampling wants.
    """
    dtype = torch.bfloat16 if use_bf16(precision) else torch.float32
    transformer_cfg = model.transformer
    if weights is not None:
        transformer_cfg = dataclasses.replace(
            transformer_cfg, arch=None, pretrained=str(weights), subfolder=None
        )
    if train is None and keep_fp32_modules:
        transformer_cfg = dataclasses.replace(transformer_cfg, dtype=str(dtype).removeprefix("torch."))
    transformer = build_transformer(transformer_cfg)
    if train is None:
        # Loaded in `dtype` already with keep_fp32_modules; a cast would undo diffusers' fp32 modules.
        transformer = (transformer.to(device) if keep_fp32_modules else transformer.to(device, dtype)).eval()
    if train is not None and train.lora.rank > 0:
        # Frozen base + peft adapters injected in place: blocks, processors and checkpointing see the same
        # module tree; the engine gives optimizer state to the adapters only (they alone require grad).
        lora = train.lora
        apply_lora(
            transformer, lora.rank, lora.alpha, lora.dropout, lora.target_modules, seed=transformer_cfg.seed
        )
    controller = install_attention(transformer, attention)
    if train is not None and train.activation_checkpointing:
        enable_checkpointing(transformer, train.keep_attention, train.keep_attention_blocks)
    stack = ModelStack(transformer, controller, dtype, model.family, objective.num_train_timesteps)
    if encoders:
        stack.text_encoder = build_text_encoder(model.text_encoder).to(device)
        stack.vae = build_vae(model.vae).to(device)
    return stack
