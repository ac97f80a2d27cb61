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
from omegaconf import DictConfig, open_dict  # noqa: E402

from data.cache import cache_dataset  # noqa: E402
from training.config import load_config  # noqa: E402

# train.yaml's run dir is a training run's; the cache's Hydra log belongs with the cache instead.
HYDRA_DEFAULTS = ["hydra.run.dir=${data.cache_dir}", "hydra.output_subdir=null"]


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    with open_dict(cfg):  # this script's own `+key=` options are not part of the training schema
        extra = {k: cfg.pop(k) for k in ("rank", "world_size", "overwrite") if k in cfg}
    rank = int(extra.get("rank", os.environ.get("RANK", 0)))
    world_size = int(extra.get("world_size", os.environ.get("WORLD_SIZE", 1)))
    config = load_config(cfg)  # the whole tree, as train.py validates it: bad keys fail before any work
    data_cfg = config.data
    manifest = cache_dataset(
        config.model.vae,
        config.model.text_encoder,
        data_cfg,
        rank=rank,
        world_size=world_size,
        overwrite=bool(extra.get("overwrite", False)),
    )
    samples = sum(len(s["items"]) for s in manifest["shards"])
    skipped = len(manifest["skipped"]) + len(manifest["input_skips"])
    print(
        f"rank {rank}/{world_size}: {samples} samples cached in {data_cfg.cache_dir}, {skipped} inputs skipped"
    )


if __name__ == "__main__":
    given = {a.split("=", 1)[0] for a in sys.argv[1:]}
    sys.argv += [d for d in HYDRA_DEFAULTS if d.split("=", 1)[0] not in given]
    main()
