"""Generate videos for fixed prompts from fixed noise: periodic samples in train.py, and sample.py."""

from pathlib import Path

import torch
from tqdm import tqdm

from data.video_io import write_video
from models.encoders import decode_latents
from training.config import GenerationConfig
from training.objective import FlowMatching, ModelFn


class PromptSampler:
    """Embeds the prompts once and draws their noise once (on CPU from `cfg.seed`, so every device and
    every run with the same seed, VMoBA or full attention, starts from the same noise).

    `noise [N, C, F', H', W']` with `F' = (frames - 1) / 4 + 1`, `H' = height / 8`, `W' = width / 8` for
    Wan's VAE (its `scale_factor_temporal/spatial`).
    """

    def __init__(
        self, cfg: GenerationConfig, objective: FlowMatching, text_encoder, vae, device: torch.device
    ):
        ft, fs = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
        if (cfg.frames - 1) % ft or cfg.height % fs or cfg.width % fs:
            raise ValueError(
                f"frames={cfg.frames}, height={cfg.height}, width={cfg.width}: frames must be {ft}k+1 and "
                f"height/width multiples of {fs} for this VAE"
            )
        self.cfg, self.objective, self.vae, self.device = cfg, objective, vae, device
        emb, mask = text_encoder.encode(list(cfg.prompts) + [cfg.negative_prompt])
        self.emb, self.mask = emb.to(device), mask.to(device)
        shape = (
            len(cfg.prompts),
            vae.config.z_dim,
            (cfg.frames - 1) // ft + 1,
            cfg.height // fs,
            cfg.width // fs,
        )
        self.noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed))

    @torch.no_grad()
    def generate(self, model_fn: ModelFn, controller=None, progress: bool = False) -> torch.Tensor:
        """Sample every prompt (one at a time) and decode: returns `pixels [N, 3, F, H, W]` in [-1, 1] on CPU.

        `controller` (from `install_attention`) gets the denoising step, for VMoBA's dense first steps."""
        cfg, videos = self.cfg, []
        on_step = controller.set_denoising_step if controller is not None else None
        uncond = {"text_emb": self.emb[-1:], "text_mask": self.mask[-1:]}
        try:
            for i in tqdm(range(len(cfg.prompts)), desc="sampling", disable=not progress, leave=False):
                cond = {"text_emb": self.emb[i : i + 1], "text_mask": self.mask[i : i + 1]}
                latents = self.objective.sample(
                    model_fn, self.noise[i : i + 1].to(self.device), cond, cfg.steps, cfg.guidance,
                    uncond=uncond, on_step=on_step, shift=cfg.shift,
                )  # fmt: skip
                videos.append(decode_latents(self.vae, latents).float().cpu())
        finally:
            if controller is not None:
                controller.set_denoising_step(None)  # back to training mode
        return torch.cat(videos)

    def write(self, videos: torch.Tensor, out_dir: str | Path) -> dict[str, Path]:
        """Write `videos [N, 3, F, H, W]` as `out_dir/prompt_XX.mp4` (and the prompts as prompts.txt)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "prompts.txt").write_text(
            "".join(f"prompt_{i:02d}: {p}\n" for i, p in enumerate(self.cfg.prompts))
        )
        return {
            f"prompt_{i:02d}": write_video(out_dir / f"prompt_{i:02d}.mp4", v, self.cfg.fps)
            for i, v in enumerate(videos)
        }
