"""Latent/text caching: decode clips, encode them once through the VAE and text encoder, write shards.

Layout of ``cache_dir``::

    shard-RRR-NNNNN.safetensors     samples of rank RRR: "i.latents" [C, F', H', W'], "i.text_emb" [S, D],
                                    "i.text_mask" [S] bool for i = 0..n-1
    manifest-RRR-of-WWW.json        what rank RRR of WWW produced so far (rewritten after every shard)
    manifest.json                   the merged manifest, written once every rank is complete

Every file is written to a temporary name and renamed, and a shard is listed in its rank's manifest only
after it is on disk, so Ctrl-C or a crash loses at most the shard in progress; re-running resumes
(and re-encodes the clips of a shard that went missing). A manifest records its producer
(`producer_description`), the input records (`data.sources.input_records`: what each clip was cached
from, compared by content, not mtimes) and their hash; a cache whose producer or inputs differ from the
current config is refused (`StaleCacheError`, listing the settings and files that changed), never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from data.clips import read_clip
from data.config import DataConfig
from data.sources import ClipSource, Skip, diff_inputs, discover, input_records, inputs_hash, report_skip
from models.encoders import (
    DTYPES,
    TextEncoderConfig,
    VAEConfig,
    build_text_encoder,
    build_vae,
    encode_video,
)

FORMAT = 2  # 2: inputs compared by content (`input_records`), shard byte sizes recorded
MANIFEST = "manifest.json"
REBUILD = (
    "rebuild it with `python scripts/cache_latents.py <the same config overrides as train.py> +overwrite=true` "
    "(or point data.cache_dir at a new folder)"
)
RESUME = (
    "re-run `python scripts/cache_latents.py <the same config overrides as train.py>` (with the WORLD_SIZE "
    "it was cached with): it resumes, re-encoding only what is missing"
)


log = logging.getLogger(__name__)


class StaleCacheError(RuntimeError):
    """The cache on disk was produced by a different config or from different inputs, or is incomplete."""


def _encoder_identity(cfg: VAEConfig | TextEncoderConfig) -> dict:
    """The encoder config, plus a hash of the weights' config.json when loading a local directory."""
    identity = asdict(cfg)
    if cfg.pretrained is not None:
        config_json = Path(cfg.pretrained, cfg.subfolder or "", "config.json")
        if config_json.is_file():
            identity["config_sha"] = hashlib.sha256(config_json.read_bytes()).hexdigest()[:16]
    return identity


def data_description(cfg: DataConfig) -> dict:
    """The DataConfig fields that change what is cached (not paths of the cache, workers or strictness)."""
    keys = (
        "source",
        "fps",
        "stride",
        "train_start",
        "train_crop",
        "val_fraction",
        "val_keys",
        "seed",
        "cache_dtype",
    )
    return {"buckets": [list(b) for b in cfg.bucket_shapes()], **{k: getattr(cfg, k) for k in keys}}


def producer_description(vae: VAEConfig, text_encoder: TextEncoderConfig, data: DataConfig) -> dict:
    """What a cache must have been produced by to be valid for this config: VAE and text-encoder identity
    (config + weights' config hash), buckets (frames, resolution), fps/stride, sampling, split, dtype.
    The trainer passes it to `data.build_dataloader(..., producer=...)`; `cache_dataset` records it."""
    return {
        "vae": _encoder_identity(vae),
        "text_encoder": _encoder_identity(text_encoder),
        "data": data_description(data),
    }


def is_validation(key: str, cfg: DataConfig) -> bool:
    """Whether a clip belongs to the validation split: listed in `val_keys`, or else a stable hash of its
    key falls below `val_fraction` (adding clips never moves existing ones between splits)."""
    if cfg.val_keys:
        return key in cfg.val_keys
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < cfg.val_fraction


def diff(recorded, expected, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested dicts: ``"key: cache X != config Y"``."""
    if isinstance(recorded, dict) and isinstance(expected, dict):
        return [
            line
            for k in sorted(set(recorded) | set(expected))
            for line in diff(recorded.get(k), expected.get(k), f"{prefix}{k}.")
        ]
    return [] if recorded == expected else [f"{prefix[:-1]}: cache {recorded!r} != config {expected!r}"]


def check_cache(manifest: dict, producer: dict, records: dict[str, dict] | None, what: str) -> None:
    """Raise `StaleCacheError` listing every producer setting (``key: cache X != config Y``) and every
    input (added / removed / modified file, `data.sources.diff_inputs`) that differs from the manifest.

    Only the producer sections present in ``producer`` are compared; ``records`` (`input_records` of
    the current inputs) is skipped when None. ``what`` names the cache in the message."""
    settings = diff({k: manifest["producer"].get(k) for k in producer}, producer)
    inputs = []
    if records is not None and inputs_hash(records) != manifest["inputs_hash"]:
        inputs = diff_inputs(manifest["inputs"], records) or [
            f"input-list hash: cache {manifest['inputs_hash']} != now {inputs_hash(records)}"
        ]
    if not settings and not inputs:
        return
    lines = [f"{what} no longer matches the config or its inputs:"]
    for title, changes in (
        ("producer settings that changed", settings),
        ("inputs that changed (by size and content; mtimes are ignored)", inputs),
    ):
        lines += [f"  {title}:", *(f"    {c}" for c in changes)] if changes else []
    raise StaleCacheError("\n".join([*lines, REBUILD]))


def shard_problem(cache_dir: Path, shard: dict) -> str | None:
    """``"<path> (missing)"`` / ``"<path> (N bytes, manifest says M)"`` when a listed shard is not on disk
    as it was written, else None: a stat, no read."""
    path = cache_dir / shard["file"]
    if not path.is_file():
        return f"{path} (missing)"
    if shard.get("bytes") is not None and path.stat().st_size != shard["bytes"]:
        return f"{path} ({path.stat().st_size} bytes, manifest says {shard['bytes']})"
    return None


def _code_version() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _atomic_write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _part_name(rank: int, world_size: int) -> str:
    return f"manifest-{rank:03d}-of-{world_size:03d}.json"


class DecodeDataset(torch.utils.data.Dataset):
    """Decodes clips in loader workers: ``(source, Clip)``, or ``(source, reason)`` for a bad clip, so one
    broken file never stops the run."""

    def __init__(self, clips: list[ClipSource], cfg: DataConfig):
        self.clips, self.cfg = clips, cfg

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        clip = self.clips[i]
        try:
            return clip, read_clip(clip, self.cfg, train=not is_validation(clip.key, self.cfg))
        except ValueError as err:
            return clip, str(err)


def no_collate(sample):
    return sample


class _ShardWriter:
    """Collects encoded samples and writes them as one shard per ``shard_size``; the rank manifest is
    rewritten after each shard, so a shard counts as done only once it is completely on disk."""

    def __init__(self, cache_dir: Path, part_path: Path, manifest: dict, rank: int, shard_size: int):
        self.cache_dir, self.part_path, self.manifest = cache_dir, part_path, manifest
        self.rank, self.shard_size = rank, shard_size
        self.pending: list[tuple[dict, dict[str, torch.Tensor]]] = []
        # Numbered after the highest shard kept, not their count: a shard dropped on resume (missing on
        # disk) leaves a gap, and a count would reuse the name of a later shard that is still listed.
        numbers = [int(shard["file"].split("-")[2].split(".")[0]) for shard in manifest["shards"]]
        self.next_number = max(numbers, default=-1) + 1

    def add(self, item: dict, sample: dict[str, torch.Tensor]) -> None:
        self.pending.append(({**item, "index": len(self.pending)}, sample))
        if len(self.pending) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{self.rank:03d}-{self.next_number:05d}.safetensors"
        self.next_number += 1
        tensors = {
            f"{i}.{k}": v.contiguous()
            for i, (_, sample) in enumerate(self.pending)
            for k, v in sample.items()
        }
        tmp = self.cache_dir / f".{name}.tmp{os.getpid()}"
        save_file(tensors, str(tmp), metadata={"format": str(FORMAT)})
        os.replace(tmp, self.cache_dir / name)
        self.manifest["shards"].append(
            {
                "file": name,
                "bytes": (self.cache_dir / name).stat().st_size,
                "items": [item for item, _ in self.pending],
            }
        )
        _atomic_write_json(self.part_path, self.manifest)
        self.pending.clear()


def _previous_manifest(cache_dir: Path, part_path: Path, rank: int, world_size: int, overwrite: bool):
    """This rank's manifest from an earlier run (None when there is none, or with ``overwrite``, which
    deletes this rank's shards and manifests); clears files a killed run left half-written."""
    if overwrite:
        for old in [*cache_dir.glob(f"shard-{rank:03d}-*.safetensors"), part_path, cache_dir / MANIFEST]:
            old.unlink(missing_ok=True)
    for leftover in cache_dir.glob(f".shard-{rank:03d}-*.tmp*"):  # from a run killed while writing
        leftover.unlink()
    other_worlds = [
        p.name
        for p in cache_dir.glob("manifest-*-of-*.json")
        if not p.name.endswith(f"-of-{world_size:03d}.json")
    ]
    if other_worlds:
        raise StaleCacheError(
            f"cache {cache_dir} was written with a different world size ({other_worlds[0]}); resume with that "
            f"world size, or delete {cache_dir} and re-run"
        )
    if not part_path.exists():
        return None
    previous = json.loads(part_path.read_text())
    if previous.get("format") != FORMAT:
        raise StaleCacheError(
            f"cache {cache_dir} has format {previous.get('format')}, expected {FORMAT}; {REBUILD}"
        )
    return previous


def _resume(previous: dict, fresh: dict, cache_dir: Path) -> dict:
    """``fresh`` with the progress of ``previous`` (this rank's earlier run), which must have the same
    producer and inputs. A listed shard that is missing or truncated on disk is dropped from the
    progress, so its clips are encoded again."""
    check_cache(previous, fresh["producer"], fresh["inputs"], f"the cache {cache_dir} started earlier")
    shards = []
    for shard in previous["shards"]:
        problem = shard_problem(cache_dir, shard)
        if problem:
            log.warning("shard %s: encoding its %d clips again", problem, len(shard["items"]))
            (cache_dir / shard["file"]).unlink(missing_ok=True)
        else:
            shards.append(shard)
    return {**fresh, "shards": shards, "skipped": previous["skipped"]}


def cache_dataset(
    vae_cfg: VAEConfig,
    text_cfg: TextEncoderConfig,
    data_cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Encode this rank's share of the clips (every ``world_size``-th, by sorted key) into the cache.

    Clips are decoded in ``data_cfg.decode_workers`` processes and encoded here on ``device`` (default:
    ``cuda:$LOCAL_RANK`` when available). Resumes: clips already in a finished shard (or already
    skipped) are not redone. Refuses a cache made by a different producer or from different inputs
    unless ``overwrite`` (which deletes this rank's shards first). Returns this rank's manifest.
    """
    from tqdm import tqdm

    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    cache_dir = Path(data_cfg.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    clips, input_skips = discover(data_cfg.source)
    input_skips = [asdict(report_skip(s, data_cfg.strict)) for s in input_skips]
    if not clips:
        reasons = "".join(f"\n  {s['path']}: {s['reason']}" for s in input_skips[:10])
        raise ValueError(
            f"data.source={data_cfg.source!r} has no usable clip (videos with a same-stem .txt caption, "
            f"or metadata rows; docs/data.md): {len(input_skips)} inputs skipped{reasons}"
        )
    unknown = sorted(set(data_cfg.val_keys) - {c.key for c in clips})
    if unknown:
        log.warning("data.val_keys not among the clips (ignored): %s", unknown)
    mine = clips[rank::world_size]
    part_path = cache_dir / _part_name(rank, world_size)
    previous = _previous_manifest(cache_dir, part_path, rank, world_size, overwrite)
    # Digests of files unchanged since the previous run (same size and mtime) are reused, not re-read.
    records = input_records(clips, known=previous.get("inputs") if previous else None)
    fresh = {
        "format": FORMAT,
        "producer": producer_description(vae_cfg, text_cfg, data_cfg),
        "inputs_hash": inputs_hash(records),
        "inputs": records,  # every clip's, so any rank's manifest can say which inputs changed
        "code_version": _code_version(),
        "rank": rank,
        "world_size": world_size,
        "num_inputs": len(mine),
        "complete": False,
        "shards": [],
        "skipped": [],  # this rank's decode failures; discovery failures are in "input_skips"
        "input_skips": input_skips,
    }
    manifest = fresh if previous is None else _resume(previous, fresh, cache_dir)
    done = {item["key"] for shard in manifest["shards"] for item in shard["items"]}
    done |= {skip["key"] for skip in manifest["skipped"]}
    todo = [c for c in mine if c.key not in done]

    cuda = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device or cuda)
    vae = build_vae(vae_cfg).to(device)
    text_encoder = build_text_encoder(text_cfg).to(device)
    store = DTYPES[data_cfg.cache_dtype]
    writer = _ShardWriter(cache_dir, part_path, manifest, rank, data_cfg.shard_size)
    loader = torch.utils.data.DataLoader(
        DecodeDataset(todo, data_cfg),
        batch_size=None,
        num_workers=data_cfg.decode_workers,
        collate_fn=no_collate,
    )
    bar = tqdm(
        total=len(mine), initial=len(mine) - len(todo), unit="clip", disable=not progress, desc=f"rank {rank}"
    )
    for source, clip in loader:
        bar.update()
        if isinstance(clip, str):  # the reason it could not be decoded
            skip = report_skip(Skip(source.path, clip), data_cfg.strict)
            manifest["skipped"].append({"key": source.key, **asdict(skip)})
            continue
        latents = encode_video(vae, clip.pixels[None].to(device))[0]  # [C, F', H', W']
        emb, mask = text_encoder.encode([source.caption])  # [1, S, D], [1, S]
        item = {
            "key": source.key,
            "caption": source.caption,
            "split": "val" if is_validation(source.key, data_cfg) else "train",
            "path": source.path,
            "frame_indices": clip.indices,
            "bucket": list(clip.bucket),
            "latent_shape": list(latents.shape),
        }
        writer.add(
            item,
            {
                "latents": latents.to(store).cpu(),
                "text_emb": emb[0].to(store).cpu(),
                "text_mask": mask[0].cpu(),
            },
        )
    bar.close()
    writer.flush()
    manifest["complete"] = True
    _atomic_write_json(part_path, manifest)
    merged = merge_manifests(cache_dir, world_size)
    if merged is not None and merged["num_samples"] == 0:
        raise ValueError(
            f"none of the {len(clips)} clips in data.source={data_cfg.source!r} could be cached: every one was "
            f"skipped (reasons under 'skipped' in {cache_dir / MANIFEST})"
        )
    return manifest


def merge_manifests(cache_dir: Path, world_size: int) -> dict | None:
    """Write ``manifest.json`` once all ``world_size`` rank manifests are complete; returns it (or None).

    Any rank may call it: the merged content is the same, and the write is atomic."""
    parts = [cache_dir / _part_name(r, world_size) for r in range(world_size)]
    if not all(p.exists() for p in parts):
        return None
    manifests = [json.loads(p.read_text()) for p in parts]
    if not all(m["complete"] for m in manifests):
        return None
    for m in manifests[1:]:  # ranks that started while the inputs were changing cached different inputs
        check_cache(
            manifests[0], {}, m["inputs"], f"rank 0's part of cache {cache_dir} (vs rank {m['rank']})"
        )
    shards = [s for m in manifests for s in m["shards"]]
    merged = {
        "format": FORMAT,
        "producer": manifests[0]["producer"],
        "inputs_hash": manifests[0]["inputs_hash"],
        "inputs": manifests[0]["inputs"],
        "code_version": manifests[0]["code_version"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "world_size": world_size,
        "num_samples": sum(len(s["items"]) for s in shards),
        "num_skipped": len(manifests[0]["input_skips"]) + sum(len(m["skipped"]) for m in manifests),
        "shards": shards,
        "skipped": manifests[0]["input_skips"] + [s for m in manifests for s in m["skipped"]],
    }
    _atomic_write_json(cache_dir / MANIFEST, merged)
    return merged


def load_manifest(cache_dir: str | Path, data_cfg: DataConfig, producer: dict | None = None) -> dict:
    """The merged manifest of a complete cache that matches the config, else `StaleCacheError` saying what
    differs and how to rebuild or repair it.

    ``producer`` (from `producer_description`) checks the VAE, text encoder and data settings; without it
    only the data settings are checked. When ``data_cfg.source`` exists, its inputs must also match the
    recorded ones by content (no clip added, removed, re-captioned or changed since caching; a copy or
    `touch` that only changes mtimes is fine). Every shard the manifest lists must be on disk with its
    recorded size, so a lost shard fails here, on every rank, before training starts."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not path.exists():
        parts = sorted(cache_dir.glob("manifest-*-of-*.json"))
        state = (
            "is incomplete (a caching run was interrupted or is still running)" if parts else "does not exist"
        )
        raise StaleCacheError(
            f"latent cache {cache_dir} {state}; run `python scripts/cache_latents.py <the same config overrides "
            "as train.py>` (it resumes where it stopped)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise StaleCacheError(
            f"cache {cache_dir} has format {manifest.get('format')}, expected {FORMAT}; {REBUILD}"
        )
    # Stat-only when nothing changed: digests are recomputed only for files with a new size or mtime.
    source = Path(data_cfg.source)
    records = input_records(discover(source)[0], known=manifest["inputs"]) if source.exists() else None
    check_cache(manifest, producer or {"data": data_description(data_cfg)}, records, f"cache {cache_dir}")
    broken = [problem for problem in (shard_problem(cache_dir, s) for s in manifest["shards"]) if problem]
    if broken:
        raise StaleCacheError(
            f"cache {cache_dir} is missing shards listed in {path}:\n  " + "\n  ".join(broken) + f"\n{RESUME}"
        )
    return manifest
