"""Encode a dataset's clips and captions once into the latent cache that training reads.

A Hydra app composing the same primary config as train.py (configs/train.yaml) and reading only
`model.vae`, `model.text_encoder` and `data`, so the cache always matches what training expects.
Resumable (re-run after Ctrl-C or a crash), and shardable over processes (RANK / WORLD_SIZE env vars,
e.g. under torchrun, or `+rank=` / `+world_size=`).

    python scripts/cache_latents.py                                   # demo data, tiny model
    python scripts/cache_latents.py model=wan2.1-1.3b data=folder data.source=/videos
    torchrun --nproc-per-node 8 scripts/cache_latents.py data=folder data.source=/videos
    python scripts/cache_latents.py +overwrite=true                   # rebuild from scratch
"""

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from data.cache import cache_dataset  # noqa: E402
from data.config import DataConfig  # noqa: E402
from models.encoders import TextEncoderConfig, VAEConfig  # noqa: E402


def validated(schema, node):
    """Merge a config node into its dataclass schema: unknown keys and bad values fail naming the key."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    rank = int(cfg.get("rank", os.environ.get("RANK", 0)))
    world_size = int(cfg.get("world_size", os.environ.get("WORLD_SIZE", 1)))
    data_cfg = validated(DataConfig, cfg.data)
    manifest = cache_dataset(
        validated(VAEConfig, cfg.model.vae),
        validated(TextEncoderConfig, cfg.model.text_encoder),
        data_cfg,
        rank=rank,
        world_size=world_size,
        overwrite=bool(cfg.get("overwrite", False)),
    )
    samples = sum(len(s["items"]) for s in manifest["shards"])
    skipped = len(manifest["skipped"]) + len(manifest["input_skips"])
    print(
        f"rank {rank}/{world_size}: {samples} samples cached in {data_cfg.cache_dir}, {skipped} inputs skipped"
    )


if __name__ == "__main__":
    main()
