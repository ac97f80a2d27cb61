"""The cached-latent dataset and its loader: lazy memory-mapped shard reads, bucketed distributed batches."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open

from data.cache import load_manifest
from data.config import DataConfig

SPLITS = ("train", "val")

log = logging.getLogger(__name__)


class CorruptCacheError(RuntimeError):
    """A cache shard that passed validation (it exists, with its recorded size) but cannot be read."""


class CachedLatentDataset(torch.utils.data.Dataset):
    """Samples of one split of a validated latent cache (see `data.cache.load_manifest`).

    Item: ``{"latents": [C, F', H', W'], "text_emb": [S, D], "text_mask": [S] bool, "caption": str,
    "key": str}`` in the cache dtype. Shards are opened lazily (memory-mapped) per process, so loader
    workers never share a file handle and only touched samples are read.
    """

    def __init__(self, cfg: DataConfig, split: str, producer: dict | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.cache_dir = Path(cfg.cache_dir)
        manifest = load_manifest(self.cache_dir, cfg, producer)
        self.items = [
            {**item, "file": shard["file"]}
            for shard in manifest["shards"]
            for item in shard["items"]
            if item["split"] == split
        ]
        self.items.sort(key=lambda item: item["key"])  # independent of which rank cached what
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()

    def __len__(self):
        return len(self.items)

    def shapes(self) -> list[tuple[int, ...]]:
        """The latent shape ``(C, F', H', W')`` of each sample: its bucket."""
        return [tuple(item["latent_shape"]) for item in self.items]

    def _shard(self, name: str):
        if os.getpid() != self._pid:  # forked into a worker: open our own handles
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.cache_dir / name), framework="pt")
        return self._handles[name]

    def __getitem__(self, i):
        item = self.items[i]
        try:
            shard = self._shard(item["file"])
            tensors = {
                k: shard.get_tensor(f"{item['index']}.{k}") for k in ("latents", "text_emb", "text_mask")
            }
        except Exception as err:  # safetensors names neither the file nor the sample
            raise CorruptCacheError(
                f"sample {item['key']!r} of {self.cache_dir / item['file']} cannot be read "
                f"({type(err).__name__}: {err}); the cache file is corrupt: delete it and re-run "
                "scripts/cache_latents.py with the same overrides (it re-encodes only the missing shards)"
            ) from err
        return {**tensors, "caption": item["caption"], "key": item["key"]}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices that never mix buckets (latent shapes), sharded over ranks.

    Per epoch: indices are grouped by bucket, shuffled within a bucket (when ``shuffle``) with a
    generator seeded by ``(seed, epoch)``, cut into global batches of ``batch_size * world_size``, and
    the global batches are shuffled; rank ``r`` takes slice ``r`` of each. So the clips of a step depend
    only on the global batch size, not on how it is split over ranks: two ranks of batch 1 see what one
    rank of batch 2 sees. The last global batch of a bucket may be smaller (dropped with ``drop_last``);
    with several ranks it is filled up with the bucket's first clips instead, so every rank gets a full
    share and the same number of steps, and no clip is left out of any epoch (a few appear twice). Each
    pass starts the next epoch; `set_epoch` picks one (e.g. when resuming).
    """

    def __init__(self, shapes, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False):  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.buckets: dict[tuple, list[int]] = {}
        for i, shape in enumerate(shapes):
            self.buckets.setdefault(tuple(shape), []).append(i)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        size = self.batch_size * self.world_size
        batches = []
        for shape in sorted(self.buckets):
            indices = self.buckets[shape]
            if self.shuffle:
                indices = [indices[j] for j in torch.randperm(len(indices), generator=generator)]
            for start in range(0, len(indices), size):
                batch = indices[start : start + size]
                if len(batch) < size and self.drop_last:
                    continue
                if len(batch) < size and self.world_size > 1:  # wrap around the bucket
                    batch = (batch + indices * (size // len(indices) + 1))[:size]
                batches.append(batch)
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=generator)]
        share = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return [batch[share] for batch in batches]

    def __len__(self):
        return len(self._batches(self.epoch))

    def __iter__(self):
        # A generator: the epoch advances when iteration starts, not on iter() (DataLoader calls iter()
        # on its sampler more than once when it builds worker iterators).
        epoch, self.epoch = self.epoch, self.epoch + 1
        yield from self._batches(epoch)


def collate(samples: list[dict]) -> dict:
    """Stack samples of one bucket: ``latents [B, C, F', H', W']``, ``text_emb [B, S, D]``,
    ``text_mask [B, S]`` bool; ``caption`` and ``key`` as lists."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("latents", "text_emb", "text_mask")}
    return {**batch, "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}


def build_dataloader(
    cfg: DataConfig,
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    producer: dict | None = None,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A loader over the cached latents of ``split`` ("train" shuffles, "val" keeps key order).

    Yields ``{"latents": [B, C, F', H', W'], "text_emb": [B, S, D], "text_mask": [B, S] bool,
    "caption": list[str], "key": list[str]}``; a batch never mixes buckets, the order is a function of
    ``seed`` and the epoch (``loader.batch_sampler.set_epoch``), and ranks get disjoint batches of equal
    count. ``producer`` (`data.cache.producer_description` of the model's VAE/text encoder and ``cfg``)
    makes the cache check cover the encoders too. Raises `data.cache.StaleCacheError` for a missing,
    incomplete, stale or mismatched cache (or a lost shard), and ValueError when the train split is empty
    or ``drop_last`` would leave no batch. Warns (once, on rank 0) when ``batch_size`` exceeds the split:
    every batch is then smaller than asked.
    """
    dataset = CachedLatentDataset(cfg, split, producer)
    if split == "train" and len(dataset) == 0:
        raise ValueError(
            f"the latent cache {cfg.cache_dir} has no train samples (data.val_fraction / data.val_keys?)"
        )
    if batch_size > len(dataset) > 0 and rank == 0:
        log.warning(
            "batch_size=%d is larger than the %d %s samples in %s: batches will hold at most %d samples",
            batch_size, len(dataset), split, cfg.cache_dir, len(dataset),
        )  # fmt: skip
    sampler = BucketBatchSampler(
        dataset.shapes(), batch_size, shuffle=split == "train", seed=seed, rank=rank, world_size=world_size,
        drop_last=drop_last,
    )  # fmt: skip
    if split == "train" and len(sampler) == 0:
        raise ValueError(
            f"drop_last with batch_size={batch_size}: no bucket of {cfg.cache_dir} has that many train samples "
            f"(largest: {max(map(len, sampler.buckets.values()))})"
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0,
    )
