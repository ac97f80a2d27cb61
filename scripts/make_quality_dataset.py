"""Make the quality experiment's dataset: photo pans with moving objects whose motion must be predicted.

Each clip films a scikit-image photo with the demo's virtual camera (scripts/make_demo_dataset.py: pan,
zoom or rotation) and draws 2-4 objects on top: discs and squares of distinct flat colours, each moving
at a constant velocity and bouncing off the frame's edges, drawn in a fixed depth order so that they
occlude each other. A model that denoises the clip must carry each object's position and velocity
across frames (and the camera's motion across the photo), which is what attention over the whole clip
is for. The caption names the photo, the camera motion and every object with its colour, shape,
direction and speed, e.g. ``a red disc moves quickly right and up bouncing off the edges in front of a
blue square moving slowly left while the camera pans slowly to the right across a photo of coffee``.

Deterministic from ``--seed``: clip i draws its objects from a generator seeded by (seed, i); the files
are ``q<seed>_<i>_<photo>_<motion>.mp4`` with a same-stem ``.txt`` caption and a ``.json`` holding the
objects (shape, colour, radius, start position and velocity in pixels and pixels per frame), which is
what the tests check decoded frames against. Re-runnable like the demo dataset: a complete clip (same
caption, objects, frame count, size and fps) is kept; every file is written to a temporary name and
renamed.

    python scripts/make_quality_dataset.py                         # 120 clips, 33 frames, 512x512
    python scripts/make_quality_dataset.py --out /tmp/q --clips 6 --frames 17 --size 128

At 33 frames of 512x512, Wan's VAE (4x time, 8x space) gives latents 9x64x64 and a 1x2x2 patch 9x32x32
= 9,216 transformer tokens per clip.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.video_io import write_video  # noqa: E402
from scripts.make_demo_dataset import MOTIONS, PHOTOS, film, is_complete, load_photo  # noqa: E402

# Flat colours far apart in RGB (and from each other's mixes), as [0, 1] triples.
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.9, 0.1, 0.9),
    "cyan": (0.1, 0.9, 0.9),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}
SHAPES = ("disc", "square")


@dataclass
class MovingObject:
    """A disc (radius `radius`) or square (half side `radius`) of one colour, centred at `start` (x, y
    pixels, frame 0) and moving `velocity` (x, y pixels per frame), reflected at the frame's edges so that
    it stays whole inside the frame. Objects later in a clip's list are drawn on top."""

    shape: str
    colour: str
    radius: float
    start: tuple[float, float]
    velocity: tuple[float, float]

    def centres(self, frames: int, size: int) -> np.ndarray:
        """Centre of the object in each frame: `[frames, 2]` (x, y) pixels.

        Free motion `start + velocity * t`, folded into [radius, size - radius] (a perfect bounce: the
        speed stays `|velocity|`, the component hitting an edge flips)."""
        t = np.arange(frames, dtype=np.float64)[:, None]
        free = np.asarray(self.start) + np.asarray(self.velocity) * t - self.radius
        span = size - 2 * self.radius
        u = np.mod(free, 2 * span)
        return self.radius + np.where(u <= span, u, 2 * span - u)

    def bounces(self, frames: int, size: int) -> bool:
        """Whether the object reaches an edge (and turns) within the clip."""
        free = np.asarray(self.start) + np.asarray(self.velocity) * (frames - 1)
        return bool(np.any(free < self.radius) or np.any(free > size - self.radius))

    def phrase(self, frames: int, size: int) -> str:
        """e.g. `a red disc moving quickly right and up bouncing off the edges`."""
        vx, vy = self.velocity  # image y grows downwards
        parts = [
            words[v > 0]
            for v, words in ((vx, ("left", "right")), (-vy, ("down", "up")))
            if abs(v) > 0.2 * math.hypot(vx, vy)  # a component under ~12 degrees off an axis goes unsaid
        ]
        speed = "quickly" if math.hypot(vx, vy) > 0.02 * size else "slowly"
        bounce = " bouncing off the edges" if self.bounces(frames, size) else ""
        return f"a {self.colour} {self.shape} moving {speed} {' and '.join(parts)}{bounce}"


def draw_objects(rng: np.random.Generator, size: int, count: int) -> list[MovingObject]:
    """`count` objects of distinct colours: radius 6-11% of `size`, speed 1-4% of `size` per frame in a
    random direction, starting anywhere they fit."""
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    objects = []
    for colour in colours:
        radius = float(rng.uniform(0.06, 0.11) * size)
        angle, speed = rng.uniform(0, 2 * math.pi), rng.uniform(0.01, 0.04) * size
        start = tuple(float(v) for v in rng.uniform(radius, size - radius, size=2))
        velocity = (float(speed * math.cos(angle)), float(speed * math.sin(angle)))
        objects.append(MovingObject(str(rng.choice(SHAPES)), str(colour), radius, start, velocity))
    return objects


def render(background: torch.Tensor, objects: list[MovingObject]) -> torch.Tensor:
    """Draw `objects` (in order: later on top) onto `background [3, F, S, S]` in [-1, 1]; returns a new
    tensor. Edges are anti-aliased over one pixel (coverage of the pixel centre's distance to the edge)."""
    _, frames, size, _ = background.shape
    video = background.clone()
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")  # [S, S]
    for obj in objects:
        c = torch.from_numpy(obj.centres(frames, size)).float()  # [F, 2]
        dx, dy = xs[None] - c[:, 0, None, None], ys[None] - c[:, 1, None, None]  # [F, S, S]
        dist = torch.hypot(dx, dy) if obj.shape == "disc" else torch.maximum(dx.abs(), dy.abs())
        alpha = (obj.radius - dist + 0.5).clamp(0, 1)[None]  # [1, F, S, S]
        colour = torch.tensor(COLOURS[obj.colour])[:, None, None, None] * 2 - 1  # [3, 1, 1, 1]
        video = video * (1 - alpha) + colour * alpha
    return video


def caption(objects: list[MovingObject], photo: str, motion: str, frames: int, size: int) -> str:
    """Objects from the top one down, then the camera and the photo."""
    top, *rest = [o.phrase(frames, size) for o in reversed(objects)]
    behind = "".join(f" in front of {p}" for p in rest)
    return f"{top}{behind} while {MOTIONS[motion][0]} a photo of {PHOTOS[photo]}\n"


def clip_plan(i: int, seed: int, size: int) -> tuple[str, str, list[MovingObject]]:
    """Clip i's photo, camera motion and objects: photos cycle, motions advance by one per photo cycle
    (so every pair comes up), 2-4 objects from the generator seeded by (seed, i)."""
    photo = list(PHOTOS)[i % len(PHOTOS)]
    motion = list(MOTIONS)[(i + i // len(PHOTOS)) % len(MOTIONS)]
    rng = np.random.default_rng([seed, i])  # independent of the other clips and of --clips
    return photo, motion, draw_objects(rng, size, count=int(rng.integers(2, 5)))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_quality_dataset(
    out: Path, clips: int, frames: int, size: int, fps: float, seed: int
) -> tuple[list[Path], int]:
    """Write `clips` clips into `out` (kept where already complete); returns the video paths and how many
    were (re)written."""
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".*.tmp*"):  # half-written files of a killed run
        leftover.unlink()
    photos: dict[str, torch.Tensor] = {}
    paths, written = [], 0
    for i in range(clips):
        photo, motion, objects = clip_plan(i, seed, size)
        path = out / f"q{seed}_{i:04d}_{photo}_{motion}.mp4"
        text = caption(objects, photo, motion, frames, size)
        meta = json.dumps({"frames": frames, "size": size, "objects": [asdict(o) for o in objects]}, indent=1)
        paths.append(path)
        meta_path = path.with_suffix(".json")
        if (
            is_complete(path, text, frames, size, fps)
            and meta_path.is_file()
            and meta_path.read_text() == meta
        ):
            continue
        if photo not in photos:
            photos[photo] = load_photo(photo)
        background = film(photos[photo], MOTIONS[motion][1], frames, size)
        write_video(path, render(background, objects), fps)
        _write_text(meta_path, meta)
        _write_text(path.with_suffix(".txt"), text)  # last: is_complete needs the caption
        written += 1
    return paths, written


def load_objects(path: Path) -> list[MovingObject]:
    """The objects of a clip from its `.json` (start and velocity back as tuples)."""
    meta = json.loads(Path(path).with_suffix(".json").read_text())
    return [
        MovingObject(o["shape"], o["colour"], o["radius"], tuple(o["start"]), tuple(o["velocity"]))
        for o in meta["objects"]
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/quality/dataset"), help="output folder")
    parser.add_argument("--clips", type=int, default=120, help="number of clips (default 120)")
    parser.add_argument("--frames", type=int, default=33, help="frames per clip, 4k+1 (default 33)")
    parser.add_argument("--size", type=int, default=512, help="square frame size in pixels (default 512)")
    parser.add_argument("--fps", type=float, default=16.0, help="frame rate written to the mp4 (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every clip's objects (default 0)")
    args = parser.parse_args(argv)
    if args.clips < 1:
        parser.error("--clips must be >= 1")
    paths, written = make_quality_dataset(args.out, args.clips, args.frames, args.size, args.fps, args.seed)
    print(
        f"{args.out}: {len(paths)} clips ({args.frames} frames, {args.size}x{args.size}, {args.fps:g} fps, "
        f"seed {args.seed}), {written} written, {len(paths) - written} already there"
    )


if __name__ == "__main__":
    main()
