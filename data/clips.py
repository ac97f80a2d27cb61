"""Clip sampling with decord: frame indices at a target fps/stride, bucket choice, resize + crop to [-1, 1].

The index arithmetic (`frame_indices`, `choose_bucket`, `crop_box`) is pure so tests can check it
exactly; `read_clip` applies it to a real file.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from data.config import DataConfig
from data.sources import ClipSource


@dataclass(frozen=True)
class Clip:
    """A decoded clip: ``pixels [3, F, H, W]`` float32 in [-1, 1] plus where it came from."""

    source: ClipSource
    pixels: torch.Tensor
    indices: list[int]  # source frame indices
    bucket: tuple[int, int, int]


def frame_step(native_fps: float, fps: float | None, stride: int | None) -> float:
    """Source frames advanced per output frame: ``native_fps / fps``, or ``stride``, or 1."""
    if fps is not None:
        return native_fps / fps
    return float(stride or 1)


def available_frames(span: int, step: float) -> int:
    """How many output frames a span of ``span`` source frames yields at ``step``."""
    return 0 if span < 1 else math.floor((span - 1) / step + 1e-9) + 1


def frame_indices(first: int, span: int, num_frames: int, step: float, offset: int) -> list[int]:
    """Source indices of ``num_frames`` frames taken every ``step`` frames, starting ``offset`` frames
    into the span ``[first, first + span)``. Raises ValueError when they do not fit."""
    if offset < 0 or offset > max_offset(span, num_frames, step):
        raise ValueError(
            f"{num_frames} frames at step {step:g} from offset {offset} do not fit in {span} frames"
        )
    return [first + offset + round(i * step) for i in range(num_frames)]


def max_offset(span: int, num_frames: int, step: float) -> int:
    """The largest start offset at which ``num_frames`` frames at ``step`` still fit in ``span``."""
    return span - 1 - round((num_frames - 1) * step)


def choose_bucket(
    buckets: list[tuple[int, int, int]], frames: int, height: int, width: int
) -> tuple[int, int, int] | None:
    """The best bucket ``(F, H, W)`` for a clip with ``frames`` output frames available at ``height x width``:
    among buckets with ``F <= frames``, the closest aspect ratio (log scale), then the most pixels.
    None when the clip is shorter than every bucket."""
    fitting = [b for b in buckets if b[0] <= frames]
    if not fitting:
        return None
    aspect = math.log(width / height)
    return min(fitting, key=lambda b: (round(abs(math.log(b[2] / b[1]) - aspect), 6), -b[0] * b[1] * b[2]))


def crop_box(height: int, width: int, out_h: int, out_w: int, generator: torch.Generator | None):
    """Resize-then-crop geometry: the frame is scaled so it covers ``out_h x out_w`` (aspect kept), then
    cropped at the center (``generator`` None) or at a random offset. Returns
    ``((resized_h, resized_w), (top, left))``."""
    scale = max(out_h / height, out_w / width)
    rh, rw = max(out_h, round(height * scale)), max(out_w, round(width * scale))
    if generator is None:
        return (rh, rw), ((rh - out_h) // 2, (rw - out_w) // 2)
    top = int(torch.randint(0, rh - out_h + 1, (1,), generator=generator))
    left = int(torch.randint(0, rw - out_w + 1, (1,), generator=generator))
    return (rh, rw), (top, left)


def clip_generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded by (seed, clip key), so each clip's random start/crop is reproducible."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def read_clip(source: ClipSource, cfg: DataConfig, train: bool) -> Clip:
    """Decode one clip of ``source`` with decord into its best bucket.

    Training clips (``train=True``) use ``cfg.train_start`` / ``cfg.train_crop`` with a generator seeded
    by ``(cfg.seed, key)``; validation clips start at the span's first frame and are center-cropped.
    Raises ValueError (the reason) when the file cannot be opened/decoded or is too short.
    """
    import decord

    try:
        reader = decord.VideoReader(source.path, num_threads=1)
        total, native_fps = len(reader), reader.get_avg_fps()
        height, width, channels = reader[0].shape
    except Exception as err:  # decord raises RuntimeError/DECORDError with long C++ traces
        raise ValueError(f"cannot open video: {str(err).splitlines()[0][:200]}") from None
    if channels != 3:  # decord 0.6 returns garbage 4-channel frames for some sizes (seen: 48 px wide)
        raise ValueError(
            f"decord decodes this {width}x{height} video as {channels}-channel frames (a decord bug for "
            f"some frame widths); re-encode it at another width, e.g. ffmpeg -i IN -vf scale={width + 16}:-2 OUT"
        )
    if total < 1 or native_fps <= 0:
        raise ValueError(f"video has no decodable frames (frames={total}, fps={native_fps})")
    first = 0 if source.start is None else round(source.start * native_fps)
    last = total if source.end is None else min(total, round(source.end * native_fps))
    span = last - first
    step = frame_step(native_fps, cfg.fps, cfg.stride)
    have = available_frames(span, step)
    bucket = choose_bucket(cfg.bucket_shapes(), have, height, width)
    if bucket is None:
        need = min(b[0] for b in cfg.bucket_shapes())
        raise ValueError(
            f"clip too short: {have} frames at step {step:g} (span {span} of {total}), needs {need}"
        )
    num_frames, out_h, out_w = bucket
    generator = clip_generator(cfg.seed, source.key) if train else None
    offset = 0
    if generator is not None and cfg.train_start == "random":
        offset = int(torch.randint(0, max_offset(span, num_frames, step) + 1, (1,), generator=generator))
    indices = frame_indices(first, span, num_frames, step, offset)
    try:
        frames = torch.from_numpy(reader.get_batch(indices).asnumpy())  # [F, h, w, 3] uint8
    except Exception as err:
        raise ValueError(f"decode failed (truncated or corrupt?): {str(err).splitlines()[0][:200]}") from None
    crop_gen = generator if cfg.train_crop == "random" else None
    (rh, rw), (top, left) = crop_box(height, width, out_h, out_w, crop_gen)
    frames = TF.resize(frames.permute(0, 3, 1, 2), [rh, rw], antialias=True)  # [F, 3, rh, rw]
    frames = TF.crop(frames, top, left, out_h, out_w)
    pixels = frames.permute(1, 0, 2, 3).float() / 127.5 - 1.0  # [3, F, H, W]
    return Clip(source, pixels, indices, bucket)
