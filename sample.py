"""Generate videos from a checkpoint with full or VMoBA attention; writes one mp4 per prompt.

    python sample.py checkpoint=outputs/demo/vmoba                      # a run dir: its checkpoints/latest
    python sample.py checkpoint=outputs/demo/vmoba/checkpoints/step_000300 attention=full
    python sample.py checkpoint=<diffusers transformer dir> prompts_file=prompts.txt steps=50 guidance=5
    python sample.py checkpoint=... attention=vmoba attention.dense_first_steps=12   # training-free VMoBA

Options are in configs/sample.yaml (documented in docs/training.md); videos go to `output_dir`.
"""

import dataclasses
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from models.attention import install_attention
from models.encoders import build_text_encoder, build_vae
from models.transformer import build_transformer
from training.checkpoint import resolve_transformer_dir
from training.config import SampleAppConfig, validate
from training.engine import use_bf16
from training.model_fn import make_model_fn
from training.objective import FlowMatching
from training.sampling import PromptSampler


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
    dtype_name = "bfloat16" if use_bf16(cfg.precision) else "float32"
    dtype = getattr(torch, dtype_name)
    # Loaded in its sampling dtype (diffusers keeps its fp32-sensitive modules then; a later `.to(dtype)`
    # would not).
    transformer_cfg = dataclasses.replace(cfg.model.transformer, dtype=dtype_name)
    if cfg.checkpoint is not None:
        path = resolve_transformer_dir(cfg.checkpoint, cfg.use_ema)
        transformer_cfg = dataclasses.replace(
            transformer_cfg, arch=None, pretrained=str(path), subfolder=None
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_transformer(transformer_cfg).to(device).eval()
    controller = install_attention(model, cfg.attention)
    objective = FlowMatching(cfg.objective)
    text_encoder = build_text_encoder(cfg.model.text_encoder).to(device)
    sampler = PromptSampler(cfg, objective, text_encoder, build_vae(cfg.model.vae).to(device), device)
    del text_encoder  # prompts are embedded; free its memory before sampling
    model_fn = make_model_fn(model, cfg.model.family, cfg.objective.num_train_timesteps, dtype)
    videos = sampler.generate(model_fn, controller, progress=True)
    return sampler.write(videos, cfg.output_dir)


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    paths = generate(validate(SampleAppConfig, cfg))
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
