"""Video files: `write_video` (PyAV, H.264 mp4, atomic) and `read_video` (decord)."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

H264_CONTAINERS = (".mp4", ".mov", ".mkv")


def to_uint8_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[C, F, H, W]`` float in [-1, 1] or ``[F, H, W, C]`` uint8 -> ``[F, H, W, 3]`` uint8 (grey -> RGB)."""
    shape_error = (
        f"video must be [C, F, H, W] float or [F, H, W, C] uint8 with C in (1, 3), got {tuple(video.shape)}"
    )
    if isinstance(video, torch.Tensor) and video.dtype != torch.uint8:
        if video.ndim != 4:
            raise ValueError(shape_error)
        video = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        video = video.permute(1, 2, 3, 0)
    video = video.cpu().numpy() if isinstance(video, torch.Tensor) else video
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] not in (1, 3):
        raise ValueError(shape_error + f" ({video.dtype})")
    return np.repeat(video, 3, axis=-1) if video.shape[-1] == 1 else video


def write_video(path: str | Path, video: torch.Tensor | np.ndarray, fps: float, crf: int = 18) -> Path:
    """Write ``video`` (``[C, F, H, W]`` float in [-1, 1], or ``[F, H, W, C]`` uint8) as an H.264 mp4.

    Written to a temporary file and renamed, so a reader never sees a half-written video. Odd sizes are
    padded by one edge pixel (yuv420p needs even sizes). Returns the path.
    """
    import av

    frames = to_uint8_frames(video)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    if path.suffix.lower() not in H264_CONTAINERS:
        raise ValueError(f"write_video: path must end in one of {H264_CONTAINERS} (H.264), got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))
            )
        container.mux(stream.encode())
    os.replace(tmp, path)
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of a video with decord: ``[F, H, W, 3]`` uint8."""
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    return reader.get_batch(list(range(len(reader)))).asnumpy()
