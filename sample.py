"""Generate videos from a checkpoint with full or VMoBA attention; writes one mp4 per prompt.

    python sample.py checkpoint=outputs/demo/vmoba                      # a run dir: its checkpoints/latest
    python sample.py checkpoint=outputs/demo/vmoba/checkpoints/step_000300 attention=full
    python sample.py checkpoint=<diffusers transformer dir> prompts_file=prompts.txt steps=50 guidance=5
    python sample.py checkpoint=... attention=vmoba attention.dense_first_steps=12   # training-free VMoBA
    python sample.py checkpoint=... scheduler=unipc          # diffusers' UniPC, as WanPipeline samples
    python sample.py model.pretrained=<Wan folder> lora=outputs/lora_run lora_scale=0.8   # base + LoRA

Options are in configs/sample.yaml (documented in docs/training.md); videos go to `output_dir`.
"""

import dataclasses
from pathlib import Path

import torch

from models.lora import DIFFUSERS_FILE, load_adapter
from schema import hydra_main
from training.checkpoint import Checkpointer, resolve_transformer_dir
from training.config import SampleAppConfig
from training.objective import FlowMatching
from training.sampling import PromptSampler
from training.stack import build_stack


def resolve_lora_file(path: str | Path, use_ema: bool = False) -> Path:
    """The adapter file for `lora=<path>`: a `.safetensors` file, a dir holding
    `pytorch_lora_weights.safetensors` (a checkpoint's `lora/`), a checkpoint dir (its `lora/` or, with
    `use_ema`, `lora_ema/`), or a run dir / checkpoints dir (the checkpoint `latest` names)."""
    path = Path(path)
    if path.is_file():
        return path
    for root in (path / "checkpoints", path):
        if (root / "latest").is_file():
            path = Checkpointer(root).latest()
            break
    for candidate in (path / ("lora_ema" if use_ema else "lora") / DIFFUSERS_FILE, path / DIFFUSERS_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"lora={path}: expected a .safetensors adapter, a dir with {DIFFUSERS_FILE}, or a LoRA run or "
        f"checkpoint dir with {'lora_ema' if use_ema else 'lora'}/ (trained with train.lora.rank > 0"
        f"{' and ema.enabled=true' if use_ema else ''})"
    )


def generate(cfg: SampleAppConfig) -> dict[str, Path]:
    """Sample `cfg.prompts` (or `cfg.prompts_file`) into `<output_dir>/prompt_XX.mp4`; returns the paths."""
    if cfg.prompts_file is not None:
        lines = Path(cfg.prompts_file).read_text().splitlines() if Path(cfg.prompts_file).is_file() else []
        prompts = [ln.strip() for ln in lines if ln.strip()]
        if not prompts:
            raise ValueError(
                f"prompts_file={cfg.prompts_file!r}: not a file with at least one non-empty line"
            )
        cfg = dataclasses.replace(cfg, prompts=prompts)
    weights = None if cfg.checkpoint is None else resolve_transformer_dir(cfg.checkpoint, cfg.use_ema)
    adapter = None if cfg.lora is None else resolve_lora_file(cfg.lora, cfg.use_ema)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Loaded in its sampling dtype: diffusers keeps its fp32-sensitive modules then.
    stack = build_stack(
        cfg.model, cfg.attention, cfg.objective, device, precision=cfg.precision, weights=weights,
        keep_fp32_modules=True,
    )  # fmt: skip
    sampler = PromptSampler(
        cfg, FlowMatching(cfg.objective), stack.text_encoder, stack.vae, device,
        transformer=stack.transformer, node="",  # a size the strides reject: `height=136: ...`, exit 2
    )  # fmt: skip
    if adapter is not None:  # peft wraps the projections in place: the attention processors call through
        load_adapter(stack.transformer, adapter, cfg.lora_scale)
    stack.text_encoder = None  # prompts are embedded; free its memory before sampling
    videos = sampler.generate(stack.model_fn(), stack.controller, progress=True)
    return sampler.write(videos, cfg.output_dir)


@hydra_main(SampleAppConfig, "sample")  # a config error: one line, exit 2
def main(config: SampleAppConfig) -> None:
    paths = generate(config)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
