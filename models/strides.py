"""The video sizes a model stack can take: frames, height and width must map onto whole latent tokens.

One latent token covers `vae_s * patch_h` x `vae_s * patch_w` pixels and `patch_t` latent frames; the VAE
encodes the first frame alone and then `vae_t` frames per latent frame, so `frames = vae_t * k + 1`.
`VideoStrides.check` is the one check of a size against them, used by `training.sampling.PromptSampler`
(sample.py, train.py's periodic samples: the built VAE's and transformer's strides) and by `data.config`
(the strides of every registered model, as no model is built there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from schema import ConfigError


@dataclass(frozen=True)
class VideoStrides:
    """The VAE's compression (`vae_t` frames, `vae_s` pixels per latent) and the transformer's patch size
    (`patch_t, patch_h, patch_w` latents per token). The defaults are every registered model's: Wan's VAE
    (4x time, 8x space) and a 1x2x2 patch (Wan) or 2x2 (CogVideoX)."""

    vae_t: int = 4
    vae_s: int = 8
    patch_t: int = 1
    patch_h: int = 2
    patch_w: int = 2

    @classmethod
    def of(cls, vae, transformer) -> VideoStrides:
        """From a built diffusers VAE (`scale_factor_temporal/spatial` in its config, as `AutoencoderKLWan`)
        and transformer (`patch_size` (t, h, w) as Wan, or an int with `patch_size_t` as CogVideoX/LTX)."""
        patch = transformer.config.patch_size
        if isinstance(patch, int):
            patch = (getattr(transformer.config, "patch_size_t", None) or 1, patch, patch)
        pt, ph, pw = (int(p) for p in patch)
        return cls(int(vae.config.scale_factor_temporal), int(vae.config.scale_factor_spatial), pt, ph, pw)

    def frames_ok(self, frames: int) -> bool:
        latent, rest = divmod(frames - 1, self.vae_t)
        return frames >= 1 and rest == 0 and (latent + 1) % self.patch_t == 0

    def check(self, frames: int, height: int, width: int, keys=("frames", "height", "width")) -> None:
        """Raise ConfigError `<key>=<value>: <rule>; use <below> or <above>` for each of frames, height and
        width (named by `keys`, the config keys the user sets) that does not fit, joined by "; "."""
        t, pt = self.vae_t, self.patch_t
        frame_rule = f"must be {t}k + 1" + (f" with k + 1 a multiple of {pt}" if pt > 1 else "")
        rules: list[tuple[int, Callable[[int], bool], str]] = [
            (frames, self.frames_ok, f"{frame_rule} (VAE {t} x patch {pt})"),
        ]
        for size, patch in ((height, self.patch_h), (width, self.patch_w)):
            stride = self.vae_s * patch
            rule = f"must be a multiple of {stride} (VAE {self.vae_s} x patch {patch})"
            rules.append((size, lambda v, s=stride: v >= s and v % s == 0, rule))
        errors = [
            f"{key}={value}: {rule}; use {_nearest(value, ok)}"
            for key, (value, ok, rule) in zip(keys, rules, strict=True)
            if not ok(value)
        ]
        if errors:
            raise ConfigError("; ".join(errors))


def _nearest(value: int, ok: Callable[[int], bool]) -> str:
    """The nearest valid values below and above `value` ("128 or 144"; only the one above when none below)."""
    above = next(v for v in range(value + 1, value + 10_000) if ok(v))
    below = next((v for v in range(value - 1, 0, -1) if ok(v)), None)
    return f"{above}" if below is None else f"{below} or {above}"
