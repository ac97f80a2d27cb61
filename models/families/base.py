"""`Family`: everything the framework knows about one kind of diffusers video transformer."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from diffusers.models.modeling_utils import ModelMixin

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class Family:
    """One model family: the registry (`models.families`) holds one per family file.

    Attributes:
        name: the `model.family` config value.
        model_class: the diffusers class (a subclass is found through it unless registered itself).
        archs: named random-init architectures (`model.transformer.arch`) -> factory building one.
        blocks: model -> its transformer blocks in layer order, each with its self-attention at `attn1`.
        grid: (model, forward args, forward kwargs) -> the latent token grid (T, H, W) of that forward;
            `install_attention` reads it in a forward pre-hook, as processors never see the latent shape.
        processor: the self-attention processor class: `processor(kernel)` computes q, k, v as the model's
            own processor does and calls `kernel(q, k, v, num_text) -> out`, all [B, S + L, H, D] with S
            text tokens first (0 without joint attention) and L video tokens in raster order.
        call: the adapter `training.model_fn` uses: (module, x [B, C, F, H, W], timestep [B], text [B, S, D])
            -> out [B, C, F, H, W]; `module` is the model or the DeepSpeed engine wrapping it.
        prepare: run on every built or loaded model (e.g. Wan's CUDA block fusion); None: nothing.
    """

    name: str
    model_class: type[ModelMixin]
    archs: Mapping[str, Callable[[], ModelMixin]]
    blocks: Callable[[ModelMixin], torch.nn.ModuleList]
    grid: Callable[[ModelMixin, tuple, dict], Grid]
    processor: type
    call: Callable[[Callable, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    prepare: Callable[[ModelMixin], Any] | None = None


class Arch(NamedTuple):
    """A named architecture: its family's name and a factory building it with random weights."""

    family: str
    build: Callable[[], ModelMixin]


def forward_arg(args: tuple, kwargs: dict, name: str, index: int = 0) -> Any:
    """Argument `name` (positional `index`) of a forward call, as a forward pre-hook receives it."""
    return args[index] if len(args) > index else kwargs[name]
