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

from data.cache import cache_dataset  # noqa: E402
from schema import hydra_main  # noqa: E402
from training.config import TrainConfig  # noqa: E402

# train.yaml's run dir is a training run's; the cache's Hydra log belongs with the cache instead.
HYDRA_DEFAULTS = ["hydra.run.dir=${data.cache_dir}", "hydra.output_subdir=null"]


# The whole tree, validated as train.py does: bad keys fail before any work. This script's own `+key=`
# options are not part of the training schema: they come as keyword arguments.
@hydra_main(TrainConfig, "train", extra_keys=("rank", "world_size", "overwrite"))
def main(config: TrainConfig, rank=None, world_size=None, overwrite=False) -> None:
    logging.basicConfig(level=logging.INFO)
    rank = int(os.environ.get("RANK", 0) if rank is None else rank)
    world_size = int(os.environ.get("WORLD_SIZE", 1) if world_size is None else world_size)
    data_cfg = config.data
    manifest = cache_dataset(
        config.model.vae,
        config.model.text_encoder,
        data_cfg,
        rank=rank,
        world_size=world_size,
        overwrite=bool(overwrite),
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
