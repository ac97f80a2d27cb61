"""Sample fidelity between two runs: PSNR, SSIM, Frechet distance, and the feature-network metrics
(LPIPS, FVD, CLIP score). Used by `evaluation.report` (`scripts/compare.py`); the training loop's own
metrics (validation loss, attention recall) are in `training.metrics`.

Videos are `[B, C, F, H, W]` float in [-1, 1] (C = 3) unless stated otherwise.

Feature-network metrics (LPIPS, FVD, CLIP score) need weights the user has on disk; they are
configured by `FeatureMetricsConfig`, and a metric whose weights are not configured or not found is
skipped with a logged note. Nothing here downloads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

log = logging.getLogger(__name__)

LPIPS_NETS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


# ----------------------------------------------------------------------------- pixel metrics


def _check_videos(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.shape != b.shape or a.ndim != 5 or a.shape[1] not in (1, 3):
        raise ValueError(
            f"{name}: expected two videos [B, C, F, H, W] of equal shape with C in (1, 3), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _unit(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] float32, any shape."""
    return ((video.float() + 1) / 2).clamp(0, 1)


def _frames(video: torch.Tensor) -> torch.Tensor:
    """`[B, C, F, H, W]` in [-1, 1] -> frames `[B*F, C, H, W]` in [0, 1]."""
    b, c, f, h, w = video.shape
    return _unit(video).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per video, in dB.

    Args:
        a, b: videos `[B, C, F, H, W]` in [-1, 1].

    Returns:
        `[B]`: `10 log10(1 / MSE)` with the MSE over each whole video after mapping to [0, 1]
        (`inf` for identical videos).
    """
    _check_videos(a, b, "psnr")
    return peak_signal_noise_ratio(_unit(a), _unit(b), data_range=1.0, reduction="none", dim=(1, 2, 3, 4))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity per video: the mean over frames of the frame SSIM (Gaussian window
    11x11, sigma 1.5, on [0, 1] data, mean over channels and over the pixels whose window lies inside
    the frame, as in Wang et al. 2004 and skimage).

    Args:
        a, b: videos `[B, C, F, H, W]` in [-1, 1], `H, W >= 11`.

    Returns:
        `[B]` in [-1, 1] (1 for identical videos).
    """
    _check_videos(a, b, "ssim")
    if min(a.shape[-2:]) < 11:
        raise ValueError(
            f"ssim: frames must be at least 11x11 (the Gaussian window), got {tuple(a.shape[-2:])}"
        )
    _, ssim_map = structural_similarity_index_measure(
        _frames(a), _frames(b), data_range=1.0, reduction="none", return_full_image=True
    )  # [B*F, C, H, W]
    # torchmetrics averages over the reflect-padded border too; the reference definition (Wang et al.,
    # skimage) averages only where the 11x11 window lies inside the frame.
    per_frame = ssim_map[..., 5:-5, 5:-5].mean(dim=(1, 2, 3))
    return per_frame.reshape(a.shape[0], a.shape[2]).mean(dim=1)


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2):
    `|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`, in float64.

    Args:
        mu1, mu2: means `[D]`; sigma1, sigma2: covariances `[D, D]` (symmetric PSD).

    The trace of the square root uses `tr((s1 s2)^(1/2)) = sum sqrt(eig(s1^(1/2) s2 s1^(1/2)))`: the inner
    matrix is symmetric PSD, so `eigh` is stable where a general `sqrtm` of `s1 s2` is not.
    """
    d = mu1.shape[-1]
    if mu2.shape != (d,) or mu1.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: expected mu [D] and sigma [D, D], got mu1 {tuple(mu1.shape)}, "
            f"sigma1 {tuple(sigma1.shape)}, mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}"
        )
    mu1, mu2, s1, s2 = (x.detach().to(torch.float64).cpu() for x in (mu1, mu2, sigma1, sigma2))
    evals, evecs = torch.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
    inner = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean `[D]` and unbiased covariance `[D, D]` (float64) of features `[N, D]`, N >= 2."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"gaussian_stats: need features [N, D] with N >= 2, got {tuple(features.shape)}")
    f = features.detach().to(torch.float64)
    return f.mean(dim=0), torch.cov(f.T)


# ----------------------------------------------------------------------------- feature networks


@dataclass
class FeatureMetricsConfig:
    """Local weights for the feature-network metrics; an unset or missing path skips that metric.

    - `lpips_backbone`: a torchvision state dict (`.pth`) of the LPIPS backbone named by `lpips_net`
      (alexnet / vgg16 / squeezenet1_1, e.g. `~/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth`);
      the LPIPS linear heads ship with torchmetrics.
    - `i3d`: a TorchScript I3D feature network (e.g. StyleGAN-V's `i3d_torchscript.pt`), called as
      `net(videos [B, 3, F, S, S] in [-1, 1], **i3d_kwargs) -> features [B, D]` with `S = i3d_size`
      (frames resized to shorter side S and center-cropped).
    - `clip`: a CLIP model directory (`CLIPModel` + processor, as written by `save_pretrained`) or a hub id
      already in the local Hugging Face cache.
    """

    lpips_backbone: str | None = None
    lpips_net: str = "alex"
    i3d: str | None = None
    i3d_size: int = 224
    i3d_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"rescale": False, "resize": False, "return_features": True}
    )
    clip: str | None = None

    def __post_init__(self) -> None:
        if self.lpips_net not in LPIPS_NETS:
            raise ValueError(f"lpips_net: got {self.lpips_net!r}, allowed: {sorted(LPIPS_NETS)}")
        if self.i3d_size < 32:
            raise ValueError(f"i3d_size: got {self.i3d_size}, must be >= 32")


@dataclass
class FeatureNetworks:
    """The feature networks loaded from a `FeatureMetricsConfig` (None where skipped)."""

    lpips: torch.nn.Module | None = None
    i3d: torch.nn.Module | None = None
    clip: tuple[Any, Any] | None = None  # (CLIPModel, processor)
    config: FeatureMetricsConfig = field(default_factory=FeatureMetricsConfig)


def _local_file(path: str | None, key: str) -> Path | None:
    if path is None:
        log.info("metrics: %s is not set; skipping that metric", key)
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        log.warning(
            "metrics: %s=%s is not a file; skipping that metric (weights are never downloaded)", key, p
        )
        return None
    return p


def load_lpips(backbone_path: str | Path, net: str = "alex") -> torch.nn.Module:
    """LPIPS (torchmetrics' network) with its backbone loaded from a local torchvision state dict.

    Returns a module `lpips(x [N, 3, H, W], y [N, 3, H, W]) -> [N, 1, 1, 1]`, inputs in [-1, 1].
    """
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    # pnet_rand: build the backbone without torchvision's download; the linear heads load from the
    # file bundled with torchmetrics.
    model = _NoTrainLpips(net=net, pnet_rand=True, pretrained=True)
    source = torch.load(backbone_path, map_location="cpu", weights_only=True)
    # torchmetrics splits torchvision's `features` Sequential into slices keyed by the same indices:
    # `sliceN.<i>.<param>` is `features.<i>.<param>`.
    state = {}
    for key in model.net.state_dict():
        _, index, rest = key.split(".", 2)
        name = f"features.{index}.{rest}"
        if name not in source:
            raise KeyError(
                f"lpips_backbone {backbone_path}: no {name!r}; is it a torchvision {LPIPS_NETS[net]}?"
            )
        state[key] = source[name]
    model.net.load_state_dict(state)
    return model.eval()


def load_feature_networks(cfg: FeatureMetricsConfig, device: str | torch.device = "cpu") -> FeatureNetworks:
    """Loads the networks whose local weights `cfg` names; logs a note for each skipped metric."""
    nets = FeatureNetworks(config=cfg)
    if (p := _local_file(cfg.lpips_backbone, "lpips_backbone")) is not None:
        nets.lpips = load_lpips(p, cfg.lpips_net).to(device)
    if (p := _local_file(cfg.i3d, "i3d")) is not None:
        nets.i3d = torch.jit.load(str(p), map_location=device).eval()
    if cfg.clip is None:
        log.info("metrics: clip is not set; skipping the CLIP score")
    else:
        from transformers import AutoProcessor, CLIPModel

        try:  # local_files_only: a directory, or a hub id already cached, but never a download
            model = CLIPModel.from_pretrained(cfg.clip, local_files_only=True).to(device).eval()
            nets.clip = (model, AutoProcessor.from_pretrained(cfg.clip, local_files_only=True))
        except OSError as err:
            log.warning(
                "metrics: clip=%s could not be loaded locally (%s); skipping the CLIP score", cfg.clip, err
            )
    return nets


@torch.no_grad()
def lpips(net: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS per video (mean over frames). a, b: `[B, 3, F, H, W]` in [-1, 1]; returns `[B]`."""
    _check_videos(a, b, "lpips")
    param = next(net.parameters())
    fa, fb = (_frames(x).to(param) * 2 - 1 for x in (a, b))
    return net(fa, fb).reshape(a.shape[0], a.shape[2]).mean(dim=1).float().cpu()


@torch.no_grad()
def i3d_features(
    net: torch.nn.Module, videos: torch.Tensor, size: int, kwargs: dict[str, Any]
) -> torch.Tensor:
    """I3D features `[B, D]` of videos `[B, 3, F, H, W]` in [-1, 1]: frames resized so the shorter side is
    `size` (bilinear), then center-cropped to `size x size`, as the common FVD preprocessing does."""
    b, c, f, h, w = videos.shape
    frames = videos.float().permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    rh, rw = round(h * size / min(h, w)), round(w * size / min(h, w))
    frames = torch.nn.functional.interpolate(frames, size=(rh, rw), mode="bilinear", align_corners=False)
    top, left = (rh - size) // 2, (rw - size) // 2
    frames = frames[..., top : top + size, left : left + size]
    clip = frames.reshape(b, f, c, size, size).permute(0, 2, 1, 3, 4).clamp(-1, 1)
    device = next(iter(net.parameters()), torch.empty(0)).device
    return net(clip.to(device), **kwargs).reshape(b, -1).double().cpu()


def fvd(net: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, size: int, kwargs: dict[str, Any]) -> float:
    """Frechet video distance between two sets of videos `[N, 3, F, H, W]` (N >= 2 each) in I3D space."""
    mu_a, s_a = gaussian_stats(i3d_features(net, a, size, kwargs))
    mu_b, s_b = gaussian_stats(i3d_features(net, b, size, kwargs))
    return frechet_distance(mu_a, s_a, mu_b, s_b)


@torch.no_grad()
def clip_score(model: Any, processor: Any, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP score per video: the mean over frames of `100 * max(cos(E_frame, E_prompt), 0)`.

    Args:
        model, processor: a transformers `CLIPModel` and its processor.
        videos: `[B, 3, F, H, W]` in [-1, 1]; prompts: `B` strings.

    Returns:
        `[B]` in [0, 100].
    """
    b, _, f, _, _ = videos.shape
    if len(prompts) != b:
        raise ValueError(f"clip_score: got {b} videos but {len(prompts)} prompts")
    device = next(model.parameters()).device
    frames = (_frames(videos) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [B*F, H, W, C]
    pixels = processor(images=list(frames), return_tensors="pt")["pixel_values"].to(device)
    text = processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
    image_emb = model.get_image_features(pixel_values=pixels).pooler_output  # [B*F, E]
    text_emb = model.get_text_features(
        input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device)
    ).pooler_output  # [B, E]
    image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1).reshape(b, f, -1)
    text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    cos = torch.einsum("bfe,be->bf", image_emb, text_emb)
    return (100 * cos.clamp(min=0)).mean(dim=1).cpu()


# ----------------------------------------------------------------------------- fidelity


def fidelity(
    videos_a: torch.Tensor,
    videos_b: torch.Tensor,
    prompts: Sequence[str] | None = None,
    networks: FeatureNetworks | None = None,
) -> dict[str, float]:
    """Compares samples of two runs made from the same prompts and noise (e.g. VMoBA vs full attention).

    Args:
        videos_a, videos_b: `[B, 3, F, H, W]` in [-1, 1], video i of both made from prompt i and noise i.
        prompts: the B prompts (for the CLIP score of each run).
        networks: loaded feature networks; LPIPS / FVD / CLIP score are computed for those present.

    Returns:
        `psnr` (mean over videos of per-video PSNR in dB; identical videos give inf), `ssim`, and where
        available `lpips`, `fvd` (needs B >= 2), `clip_score_a`, `clip_score_b`.
    """
    _check_videos(videos_a, videos_b, "fidelity")
    out = {"psnr": float(psnr(videos_a, videos_b).mean()), "ssim": float(ssim(videos_a, videos_b).mean())}
    if networks is None:
        return out
    cfg = networks.config
    if networks.lpips is not None:
        out["lpips"] = float(lpips(networks.lpips, videos_a, videos_b).mean())
    if networks.i3d is not None:
        if videos_a.shape[0] < 2:
            log.info("metrics: FVD needs at least 2 videos per run, got %d; skipped", videos_a.shape[0])
        else:
            out["fvd"] = fvd(networks.i3d, videos_a, videos_b, cfg.i3d_size, cfg.i3d_kwargs)
    if networks.clip is not None:
        if prompts is None:
            log.info("metrics: no prompts given; CLIP score skipped")
        else:
            model, processor = networks.clip
            out["clip_score_a"] = float(clip_score(model, processor, videos_a, prompts).mean())
            out["clip_score_b"] = float(clip_score(model, processor, videos_b, prompts).mean())
    return out
