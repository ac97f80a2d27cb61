"""Video clip datasets: decord clip reading, buckets, latent/text caching, the cached-latent loader.

Modules: `data.config` (DataConfig), `data.sources` (find clips + captions), `data.clips` (decord
sampling, resize/crop), `data.cache` (cache_dataset, manifests, producer_description), `data.loader`
(CachedLatentDataset, BucketBatchSampler, build_dataloader), `data.video_io` (write_video/read_video).
"""

from data.config import DataConfig
from data.loader import build_dataloader

__all__ = ["DataConfig", "build_dataloader"]
