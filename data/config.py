"""`DataConfig`: the validated schema of the Hydra `data` node (clip sampling, buckets, cache, loader)."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.strides import VideoStrides

CACHE_DTYPES = ("float32", "bfloat16", "float16")
STARTS = ("random", "first")
CROPS = ("center", "random")
# Clip sizes must map onto whole latent tokens of the model trained on them: no model is built here, so
# they are checked against every registered model's strides (Wan's VAE 4x/8x, a 2x2 patch).
STRIDES = VideoStrides()


@dataclass
class DataConfig:
    """Where clips come from, how they are sampled into `(F, H, W)` buckets, and where latents are cached.

    `frames`/`height`/`width` define the single default bucket; `buckets` (a list of `[F, H, W]`)
    replaces it when non-empty. Frames must be `4k + 1` (Wan's VAE: 4x temporal compression), sizes a
    multiple of 16 (its 8x spatial compression x the 2x2 patch: `models.strides`). Sampling rate: `fps`
    (resample to this rate) or `stride` (take every n-th frame); neither means every native frame.
    Training clips start at a seeded random (`train_start="random"`) or the first frame of their span;
    validation clips always start at the first frame and are center-cropped, so validation is identical
    across runs.
    """

    source: str = (
        "outputs/demo/dataset"  # folder of videos + same-stem .txt, or a .csv / .jsonl metadata file
    )
    cache_dir: str = "outputs/demo/cache"  # latent/text cache (safetensors shards + manifest JSON)
    frames: int = 17
    height: int = 128
    width: int = 128
    buckets: list[list[int]] = field(
        default_factory=list
    )  # [[F, H, W], ...]; empty: [[frames, height, width]]
    fps: float | None = None
    stride: int | None = None
    train_start: str = "random"  # random | first
    train_crop: str = "center"  # center | random
    val_fraction: float = 0.1  # share of clips held out (by a stable hash of the clip key)
    val_keys: list[str] = field(default_factory=list)  # explicit validation keys; overrides val_fraction
    seed: int = 0  # seeds the random starts/crops drawn at cache time
    cache_dtype: str = "float32"  # float32 | bfloat16 | float16 (bfloat16 halves the cache on disk)
    shard_size: int = 32  # samples per safetensors shard (the unit of crash-safety)
    num_workers: int = (
        0  # training loader workers (cached reads are memory-mapped and cheap: see bench_data.py)
    )
    decode_workers: int = 2  # processes decoding clips while caching (decord + resize run there)
    strict: bool = False  # raise on the first bad input instead of skipping it

    def __post_init__(self):
        for key in ("source", "cache_dir"):
            if getattr(self, key) in ("", "???"):  # "???" is OmegaConf's unset mandatory value
                raise ValueError(f"data.{key} must be set to a path (e.g. data.{key}=/path/to/videos)")
        for i, bucket in enumerate(self.bucket_shapes()):
            key = f"data.buckets[{i}]" if self.buckets else "data.frames/height/width"
            if len(bucket) != 3 or any(not isinstance(v, int) or v < 1 for v in bucket):
                raise ValueError(f"{key} must be three positive ints [F, H, W], got {list(bucket)}")
            dims = [f"buckets[{i}][{j}]" for j in range(3)] if self.buckets else ("frames", "height", "width")
            STRIDES.check(*bucket, keys=[f"data.{dim}" for dim in dims])
        if len(set(self.bucket_shapes())) != len(self.bucket_shapes()):
            raise ValueError(f"data.buckets has duplicates: {self.buckets}")
        if self.fps is not None and self.stride is not None:
            raise ValueError("set at most one of data.fps and data.stride")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"data.fps must be > 0, got {self.fps}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"data.stride must be >= 1, got {self.stride}")
        for key, allowed in (("train_start", STARTS), ("train_crop", CROPS), ("cache_dtype", CACHE_DTYPES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"data.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_size < 1:
            raise ValueError(f"data.shard_size must be >= 1, got {self.shard_size}")
        for key in ("num_workers", "decode_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")

    def bucket_shapes(self) -> list[tuple[int, int, int]]:
        """The `(F, H, W)` buckets clips are sampled into."""
        if self.buckets:
            return [tuple(b) for b in self.buckets]
        return [(self.frames, self.height, self.width)]
