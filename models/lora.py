"""LoRA adapters on a diffusers video transformer (through `peft`): apply, list, convert, merge.

`apply_lora` injects peft LoRA layers in place (diffusers' `add_adapter`, i.e. peft's
`inject_adapter_in_model`): each targeted `nn.Linear` becomes a peft `lora.Linear` at the same path, so the
module tree, the families' block accessors (`model.blocks`) and the attention processors installed on
`attn1` keep working (the processors call `attn.to_q(x)`, which now runs base + adapter). Only the adapter
parameters require grad, so the DeepSpeed engine (built from the parameters that require grad) gives
optimizer state to them alone.

Two file formats of the same adapter (docs/training.md, "Fine-tune Wan-2.1 with LoRA"):

- diffusers: `transformer.blocks.N.attn1.to_q.lora_A.weight` ..., with the peft `LoraConfig` (rank, alpha)
  in the safetensors metadata, as `WanPipeline.save_lora_weights` writes and `load_lora_weights` reads;
- original Wan / ComfyUI: `diffusion_model.blocks.N.self_attn.q.lora_A.weight` ... (`WAN_ORIGINAL_NAMES`),
  with `alpha / rank` folded into `lora_B`, so any loader (ComfyUI, DiffSynth, diffusers' converter) that
  applies `B @ A` at scale 1 gets the same weights.
"""

from pathlib import Path

import safetensors.torch
import torch

ADAPTER = "default"  # the peft adapter name of the trained adapter
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name `load_lora_weights(<dir>)` looks for
ORIGINAL_FILE = "comfyui_lora.safetensors"
ORIGINAL_PREFIX = "diffusion_model."

# Wan-2.1 block sub-modules: diffusers name -> the original Wan code's name (and ComfyUI's). The same table
# as diffusers' `_convert_non_diffusers_wan_lora_to_diffusers`, which tests/test_lora.py checks.
WAN_ORIGINAL_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
# The default targets: the q/k/v/o projections of self- and cross-attention and the FFN of every block.
WAN_TARGETS = list(WAN_ORIGINAL_NAMES)


def apply_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    seed: int = 0,
):
    """Freeze `model` and inject LoRA adapters of `rank` into the `nn.Linear` modules whose names end with
    one of `target_modules` (peft's matching; None: `WAN_TARGETS`). `alpha` None = `rank` (scale 1).
    `lora_A` is drawn from `seed` without touching the global RNG (every rank and every ZeRO stage starts
    from the same adapter), `lora_B` is zero, so the model's output is unchanged. Returns the LoraConfig."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules or WAN_TARGETS),
        init_lora_weights=True,
    )
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(config, adapter_name=ADAPTER)
    return config


def has_lora(model: torch.nn.Module) -> bool:
    """Whether `model` carries a peft adapter (`apply_lora` or diffusers' `load_lora_adapter`)."""
    return bool(getattr(model, "peft_config", None))


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path -> peft LoRA layer (e.g. `blocks.0.attn1.to_q`)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers keys without prefix: `blocks.N.attn1.to_q.lora_A.weight`
    `[r, in]`, `...lora_B.weight` `[out, r]` (detached, contiguous, on CPU). Under ZeRO-3 call it inside a
    gather of the adapter parameters."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def adapter_metadata(model: torch.nn.Module) -> dict:
    """The adapter's `LoraConfig` as a JSON-able dict (what diffusers stores in the file's metadata)."""
    config = model.peft_config[ADAPTER].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def _scale(metadata: dict) -> float:
    return metadata["lora_alpha"] / metadata["r"]


def _original_name(module: str) -> str:
    """`blocks.N.<diffusers sub-module>` -> `blocks.N.<original sub-module>`; KeyError for others."""
    head, index, rest = module.split(".", 2)
    if head != "blocks" or rest not in WAN_ORIGINAL_NAMES:
        raise KeyError(f"no original Wan name for the LoRA module {module!r} (known: {WAN_TARGETS})")
    return f"blocks.{index}.{WAN_ORIGINAL_NAMES[rest]}"


def to_original(state: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """diffusers keys (`blocks.N.attn1.to_q.lora_A.weight`) -> original Wan / ComfyUI keys
    (`diffusion_model.blocks.N.self_attn.q.lora_A.weight`), with `scale` (alpha / rank) folded into lora_B."""
    out = {}
    for key, value in state.items():
        module, part = key.rsplit(".lora_", 1)  # part: "A.weight" | "B.weight"
        out[f"{ORIGINAL_PREFIX}{_original_name(module)}.lora_{part}"] = (
            value * scale if part[0] == "B" else value
        )
    return out


def from_original(state: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The inverse of `to_original`: lora_B divided by `scale` again."""
    back = {f"blocks.N.{v}": k for k, v in WAN_ORIGINAL_NAMES.items()}
    out = {}
    for key, value in state.items():
        module, part = key.removeprefix(ORIGINAL_PREFIX).rsplit(".lora_", 1)
        _, index, rest = module.split(".", 2)
        name = back[f"blocks.N.{rest}"]
        out[f"blocks.{index}.{name}.lora_{part}"] = value / scale if part[0] == "B" else value
    return out


def save_adapter(
    state: dict[str, torch.Tensor], metadata: dict, out_dir: str | Path, original: bool = True
) -> Path:
    """Write `state` (from `adapter_state_dict`) to `out_dir/pytorch_lora_weights.safetensors` in the
    diffusers format (`WanPipeline.load_lora_weights(out_dir)` reads it) and, with `original`, to
    `out_dir/comfyui_lora.safetensors` in the original Wan / ComfyUI keys. Returns `out_dir`."""
    from diffusers import WanPipeline

    out_dir = Path(out_dir)
    WanPipeline.save_lora_weights(
        out_dir, transformer_lora_layers=state, transformer_lora_adapter_metadata=dict(metadata),
        weight_name=DIFFUSERS_FILE,
    )  # fmt: skip
    if original:
        safetensors.torch.save_file(
            to_original(state, _scale(metadata)), out_dir / ORIGINAL_FILE, metadata={"format": "pt"}
        )
    return out_dir


def load_adapter(model: torch.nn.Module, file: str | Path, scale: float = 1.0) -> None:
    """Load an adapter file (diffusers or original Wan / ComfyUI keys: diffusers'
    `WanPipeline.lora_state_dict` converts either) into `model` as adapter `ADAPTER`, applied at `scale`
    (1 = as trained)."""
    from diffusers import WanPipeline

    state, metadata = WanPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    model.load_lora_adapter(state, adapter_name=ADAPTER, metadata=metadata, prefix="transformer")
    if scale != 1.0:
        model.set_adapters([ADAPTER], weights=[scale])


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict (diffusers keys) with every adapter merged: `W + scale * B @ A` for each
    LoRA layer, in W's dtype. Under ZeRO-3 call it inside a gather of all parameters."""
    layers = lora_layers(model)
    merged = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        merged[key.replace(".base_layer.", ".")] = value.detach().cpu().contiguous()
    for name, layer in layers.items():
        weight = layer.base_layer.weight
        delta = layer.get_delta_weight(ADAPTER)
        merged[f"{name}.weight"] = (weight.float() + delta.float()).to(weight.dtype).cpu().contiguous()
    return merged


def save_merged(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the merged transformer as a diffusers folder (`config.json` + safetensors) that
    `from_pretrained` loads without peft."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_config(out_dir)
    safetensors.torch.save_file(
        merged_state_dict(model), out_dir / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"}
    )
    return out_dir
