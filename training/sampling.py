"""Generate videos for fixed prompts from fixed noise: periodic samples in train.py, and sample.py."""

from pathlib import Path

import torch
from tqdm import tqdm

from data.video_io import write_video
from models.encoders import decode_latents
from models.strides import VideoStrides
from training.config import GenerationConfig
from training.objective import FlowMatching, ModelFn


class PromptSampler:
    """Embeds the prompts once and draws their noise once (on CPU from `cfg.seed`, so every device and
    every run with the same seed, VMoBA or full attention, starts from the same noise).

    `noise [N, C, F', H', W']` with `F' = (frames - 1) / 4 + 1`, `H' = height / 8`, `W' = width / 8` for
    Wan's VAE (its `scale_factor_temporal/spatial`).

    The size is checked first against the VAE's compression times `transformer`'s patch size
    (`models.strides`): a ConfigError naming `<node>.height` etc. (`node` "" for sample.py's top level).
    """

    def __init__(
        self,
        cfg: GenerationConfig,
        objective: FlowMatching,
        text_encoder,
        vae,
        device: torch.device,
        *,
        transformer: torch.nn.Module,
        node: str = "sample",
    ):
        keys = [f"{node}.{dim}" if node else dim for dim in ("frames", "height", "width")]
        VideoStrides.of(vae, transformer).check(cfg.frames, cfg.height, cfg.width, keys=keys)
        ft, fs = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
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
        uncond = {"text_emb": self.emb[-1:], "text_mask": self.mask[-1:]}
        # The bar counts denoising steps of every prompt (a step is seconds on a real model).
        bar = tqdm(
            total=len(cfg.prompts) * cfg.steps,
            desc="sampling",
            unit="step",
            disable=not progress,
            leave=False,
        )

        def on_step(step: int) -> None:  # called before each step: the ones before it are done
            bar.update(i * cfg.steps + step - bar.n)
            if controller is not None:
                controller.set_denoising_step(step)

        try:
            for i in range(len(cfg.prompts)):
                bar.set_postfix_str(f"prompt {i + 1}/{len(cfg.prompts)}")
                cond = {"text_emb": self.emb[i : i + 1], "text_mask": self.mask[i : i + 1]}
                latents = self.objective.sample(
                    model_fn, self.noise[i : i + 1].to(self.device), cond, cfg.steps, cfg.guidance,
                    uncond=uncond, on_step=on_step, shift=cfg.shift, scheduler=cfg.scheduler,
                )  # fmt: skip
                bar.update((i + 1) * cfg.steps - bar.n)
                videos.append(decode_latents(self.vae, latents).float().cpu())
        finally:
            bar.close()
            if controller is not None:
                controller.set_denoising_step(None)  # back to training mode
        return torch.cat(videos)

    def captions(self, written: dict[str, Path]) -> dict[str, str]:
        """The prompt of each video `write` returned, by its key (`prompt_00`, ...)."""
        return {key: self.cfg.prompts[int(key.removeprefix("prompt_"))] for key in written}

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
