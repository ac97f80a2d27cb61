"""Make the embedded demo dataset: camera-motion clips of photos that ship with scikit-image.

Each photo (astronaut, coffee, chelsea, rocket, ...) is filmed by a virtual camera that pans, zooms or
rotates over it; each clip is written as a real H.264 mp4 with a same-stem .txt caption describing the
photo and the motion, e.g. ``astronaut_pan_right.mp4`` / ``astronaut_pan_right.txt``. No network needed.

Re-runnable: a clip already there with its caption, frame count, size and fps is kept as it is (not
rewritten, so a latent cache made from it stays valid); both files are written to a temporary name and
renamed, so a killed run never leaves a half-written clip behind that a later run would keep.

    python scripts/make_demo_dataset.py                      # -> outputs/demo/dataset (24 clips)
    python scripts/make_demo_dataset.py --out /tmp/demo --frames 33 --size 256 --motions-per-photo 7
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data.video_io import write_video  # noqa: E402

# skimage.data name -> what the caption calls it (words the tiny tokenizer knows).
PHOTOS = {
    "astronaut": "an astronaut in an orange spacesuit with a flag",
    "coffee": "a cup of coffee on a saucer",
    "chelsea": "an orange tabby cat",
    "rocket": "a rocket on the launch pad",
    "hubble_deep_field": "deep field galaxies and stars",
    "immunohistochemistry": "cells in tissue under a microscope",
    "colorwheel": "a rainbow colour wheel",
    "coins": "old silver coins",
    "moon": "the moon surface with craters",
    "camera": "a man with a camera",
    "brick": "a brick wall",
    "gravel": "gravel stones",
}

# motion -> (caption phrase, per-frame camera: t in [0, 1] -> (scale, angle in degrees, shift x, shift y)).
# `scale` is the visible fraction of the (square-cropped) photo; shifts are in the photo's [-1, 1] units.
MOTIONS = {
    "pan_right": ("the camera pans slowly to the right across", lambda t: (0.6, 0.0, -0.35 + 0.7 * t, 0.0)),
    "pan_left": ("the camera pans slowly to the left across", lambda t: (0.6, 0.0, 0.35 - 0.7 * t, 0.0)),
    "pan_down": ("the camera tilts down over", lambda t: (0.6, 0.0, 0.0, -0.35 + 0.7 * t)),
    "zoom_in": ("the camera zooms in on", lambda t: (0.95 - 0.5 * t, 0.0, 0.0, 0.0)),
    "zoom_out": ("the camera zooms out from", lambda t: (0.45 + 0.5 * t, 0.0, 0.0, 0.0)),
    "rotate_clockwise": ("the camera rotates clockwise over", lambda t: (0.6, 40.0 * t, 0.0, 0.0)),
    "rotate_counterclockwise": (
        "the camera rotates counterclockwise over",
        lambda t: (0.6, -40.0 * t, 0.0, 0.0),
    ),
}


def load_photo(name: str) -> torch.Tensor:
    """A scikit-image photo as ``[1, 3, S, S]`` float in [0, 1], center-cropped to a square."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    h, w = image.shape[:2]
    side = min(h, w)
    image = image[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side, :3]
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def film(photo: torch.Tensor, camera, frames: int, size: int) -> torch.Tensor:
    """Render ``frames`` views of ``photo [1, 3, S, S]`` along ``camera``: ``[3, F, size, size]`` in [-1, 1]."""
    thetas = []
    for i in range(frames):
        scale, angle, dx, dy = camera(i / max(frames - 1, 1))
        a = math.radians(angle)
        # Output grid (x, y) in [-1, 1] -> photo coordinates: rotate, scale, then shift.
        thetas.append(
            [[scale * math.cos(a), -scale * math.sin(a), dx], [scale * math.sin(a), scale * math.cos(a), dy]]
        )
    theta = torch.tensor(thetas, dtype=torch.float32)  # [F, 2, 3]
    grid = F.affine_grid(theta, [frames, 3, size, size], align_corners=False)
    # Antialias: shrink the photo to about twice the output's sampling rate before bilinear sampling.
    source = F.interpolate(photo, size=2 * size, mode="area") if photo.shape[-1] > 2 * size else photo
    video = F.grid_sample(
        source.expand(frames, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return video.permute(1, 0, 2, 3).clamp(0, 1) * 2 - 1  # [3, F, size, size]


def is_complete(path: Path, caption: str, frames: int, size: int, fps: float) -> bool:
    """Whether ``path`` (and its .txt) is already this clip: the same caption, and a video decord opens with
    ``frames`` frames of ``size`` (padded to even) at ``fps``. Files only appear by rename, so one that
    exists was written completely; this catches clips made with other options."""
    import decord

    txt = path.with_suffix(".txt")
    if not (path.is_file() and txt.is_file()) or txt.read_text() != caption:
        return False
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        shape = reader[0].shape
    except Exception:  # decord raises RuntimeError/DECORDError for a file it cannot open
        return False
    even = size + size % 2
    return len(reader) == frames and shape == (even, even, 3) and abs(reader.get_avg_fps() - fps) < 1e-2 * fps


def make_demo_dataset(
    out: Path, frames: int, size: int, fps: float, num_photos: int, motions_per_photo: int
) -> tuple[list[Path], int]:
    """Write ``num_photos * motions_per_photo`` clips (photo i gets motions i, i+1, ... cyclically, so all
    motions appear), keeping those already complete (`is_complete`); returns the video paths and how
    many were (re)written."""
    for leftover in out.glob(".*.tmp*"):  # half-written files of a killed run
        leftover.unlink()
    names, motions = list(PHOTOS)[:num_photos], list(MOTIONS)
    paths, written = [], 0
    for i, name in enumerate(names):
        photo = None
        for j in range(motions_per_photo):
            motion = motions[(i + j) % len(motions)]
            phrase, camera = MOTIONS[motion]
            path = out / f"{name}_{motion}.mp4"
            caption = f"{phrase} a photo of {PHOTOS[name]}\n"
            paths.append(path)
            if is_complete(path, caption, frames, size, fps):
                continue
            photo = load_photo(name) if photo is None else photo
            write_video(path, film(photo, camera, frames, size), fps)
            tmp = out / f".{path.stem}.tmp{os.getpid()}.txt"
            tmp.write_text(caption)
            os.replace(tmp, path.with_suffix(".txt"))
            written += 1
    return paths, written


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo/dataset"), help="output folder")
    parser.add_argument("--frames", type=int, default=24, help="frames per clip (default 24: 3 s at 8 fps)")
    parser.add_argument("--size", type=int, default=160, help="square frame size in pixels (default 160)")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate written to the mp4 (default 8)")
    parser.add_argument(
        "--photos", type=int, default=8, help=f"number of photos, at most {len(PHOTOS)} (default 8)"
    )
    parser.add_argument(
        "--motions-per-photo", type=int, default=3, help=f"at most {len(MOTIONS)} (default 3)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.photos <= len(PHOTOS):
        parser.error(f"--photos must be in [1, {len(PHOTOS)}]")
    if not 1 <= args.motions_per_photo <= len(MOTIONS):
        parser.error(f"--motions-per-photo must be in [1, {len(MOTIONS)}]")
    paths, written = make_demo_dataset(
        args.out, args.frames, args.size, args.fps, args.photos, args.motions_per_photo
    )
    print(
        f"{args.out}: {len(paths)} clips ({args.frames} frames, {args.size}x{args.size}, {args.fps:g} fps), "
        f"{written} written, {len(paths) - written} already there"
    )


if __name__ == "__main__":
    main()
