"""Build the diffusion transformer: a pretrained diffusers folder / hub id, or a named random-init arch."""

import os

import torch
from diffusers import AutoModel
from diffusers.models.modeling_utils import ModelMixin

from models.config import TransformerConfig
from models.families import ARCHS, family_of


def build_transformer(cfg: TransformerConfig) -> ModelMixin:
    """Return the transformer described by `cfg` (in `cfg.dtype`, on CPU, in train mode).

    `cfg.pretrained` loads through diffusers `AutoModel.from_pretrained` (local folder or hub id; the
    class comes from the folder's config.json, so any family loads); otherwise `cfg.arch` (one of
    `models.families.ARCHS`) is built with random weights drawn from `cfg.seed` without touching the global
    RNG. Then its family's `prepare` runs (Wan: blocks with their elementwise chains fused on CUDA).
    """
    dtype = getattr(torch, cfg.dtype)
    if cfg.pretrained is not None:
        try:
            model = AutoModel.from_pretrained(cfg.pretrained, subfolder=cfg.subfolder, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            where = os.path.join(cfg.pretrained, cfg.subfolder or "")
            raise OSError(
                f"model.transformer.pretrained={cfg.pretrained!r} (subfolder={cfg.subfolder!r}): no diffusers "
                f"model at {where!r} (expected config.json + weights) and not loadable as a hub id "
                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {err}"
            ) from err
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = ARCHS[cfg.arch].build()
        if dtype != torch.float32:  # built in fp32; skip a no-op cast (diffusers warns on every `.to`)
            model = model.to(dtype)
    prepare = family_of(model).prepare
    if prepare is not None:
        prepare(model)
    return model.train()
