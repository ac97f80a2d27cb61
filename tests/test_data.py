"""data/: config validation, input discovery and bad inputs, decord clip sampling, buckets, video I/O,
and the bucketed distributed batch sampler. Videos are real mp4s written with PyAV, decoded by decord."""

import json

import numpy as np
import pytest
import torch

from data.clips import (
    available_frames,
    choose_bucket,
    crop_box,
    frame_indices,
    frame_step,
    max_offset,
    read_clip,
)
from data.config import DataConfig
from data.loader import BucketBatchSampler
from data.sources import BadInputError, ClipSource, Skip, discover, report_skip
from data.video_io import read_video, write_video

CODE = 9  # frame i is filled with grey level 9 * i, so the decoded mean identifies the frame


def coded_video(path, num_frames, height=32, width=32, fps=8):
    """Write an mp4 whose frame i is uniformly grey 9 * i (i < 28)."""
    frames = np.stack([np.full((height, width, 3), CODE * i, np.uint8) for i in range(num_frames)])
    return write_video(path, frames, fps)


def decoded_codes(pixels):
    """Frame codes of a clip ``[3, F, H, W]`` in [-1, 1]."""
    levels = (pixels + 1) * 127.5
    return [round(v) for v in (levels.mean(dim=(0, 2, 3)) / CODE).tolist()]


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="data.source must be set"):
        DataConfig(source="???")
    with pytest.raises(
        ValueError, match=r"^data.frames=16: must be 4k \+ 1 \(VAE 4 x patch 1\); use 13 or 17$"
    ):
        DataConfig(frames=16)
    with pytest.raises(
        ValueError, match=r"^data.buckets\[1\]\[1\]=40: must be a multiple of 16 .*; use 32 or 48$"
    ):
        DataConfig(buckets=[[17, 32, 32], [17, 40, 32]])
    with pytest.raises(ValueError, match="at most one of data.fps and data.stride"):
        DataConfig(fps=8, stride=2)
    with pytest.raises(ValueError, match="data.train_crop must be one of"):
        DataConfig(train_crop="left")
    with pytest.raises(ValueError, match="data.val_fraction"):
        DataConfig(val_fraction=1.0)
    assert DataConfig(buckets=[[9, 32, 64], [5, 32, 32]]).bucket_shapes() == [(9, 32, 64), (5, 32, 32)]


def test_frame_index_arithmetic():
    assert frame_step(24.0, fps=8.0, stride=None) == 3.0
    assert frame_step(24.0, fps=None, stride=2) == 2.0 and frame_step(24.0, None, None) == 1.0
    assert available_frames(30, 3.0) == 10 and available_frames(0, 1.0) == 0
    assert max_offset(30, 5, 3.0) == 17
    assert frame_indices(10, 30, 5, 3.0, offset=2) == [12, 15, 18, 21, 24]
    assert frame_indices(0, 10, 4, 1.5, offset=0) == [0, 2, 3, 4]  # round half to even, non-integer step
    with pytest.raises(ValueError, match="do not fit"):
        frame_indices(0, 30, 5, 3.0, offset=18)


def test_choose_bucket_by_aspect_then_size_and_length():
    buckets = [(17, 32, 64), (17, 64, 32), (9, 32, 32), (17, 32, 32), (9, 32, 64)]
    assert choose_bucket(buckets, frames=20, height=100, width=210) == (17, 32, 64)
    assert choose_bucket(buckets, frames=20, height=300, width=160) == (17, 64, 32)
    assert choose_bucket(buckets, frames=20, height=50, width=50) == (17, 32, 32)
    assert choose_bucket(buckets, frames=12, height=50, width=50) == (9, 32, 32)
    assert choose_bucket(buckets, frames=12, height=100, width=200) == (9, 32, 64)
    assert choose_bucket(buckets, frames=8, height=50, width=50) is None


def test_crop_box_geometry():
    assert crop_box(48, 80, 32, 32, None) == ((32, 53), (0, 10))  # cover, keep aspect, center
    assert crop_box(80, 48, 32, 32, None) == ((53, 32), (10, 0))
    generator = torch.Generator().manual_seed(0)
    offsets = {crop_box(48, 80, 32, 32, generator)[1] for _ in range(40)}
    assert all(top == 0 and 0 <= left <= 21 for top, left in offsets) and len(offsets) > 5


def test_read_clip_exact_indices_stride_fps_and_span(tmp_path):
    path = str(coded_video(tmp_path / "v.mp4", 28, fps=8))
    source = ClipSource("v", path, "a clip")
    clip = read_clip(source, DataConfig(frames=9, height=32, width=32, stride=2), train=False)
    assert clip.indices == list(range(0, 17, 2)) and decoded_codes(clip.pixels) == clip.indices
    assert clip.pixels.shape == (3, 9, 32, 32) and clip.pixels.dtype == torch.float32
    # fps=4 on an 8 fps video is stride 2; a span [1 s, 3 s) starts at frame 8 and holds 16 frames.
    span = ClipSource("v@1-3", path, "a clip", start=1.0, end=3.0)
    clip = read_clip(span, DataConfig(frames=5, height=32, width=32, fps=4), train=False)
    assert clip.indices == [8, 10, 12, 14, 16] and decoded_codes(clip.pixels) == clip.indices
    # Training starts at a seeded random offset: reproducible per (seed, key), varying across keys.
    cfg = DataConfig(frames=5, height=32, width=32, stride=3, train_start="random")
    starts = set()
    for k in range(8):
        clip = read_clip(ClipSource(f"k{k}", path, "c"), cfg, train=True)
        again = read_clip(ClipSource(f"k{k}", path, "c"), cfg, train=True)
        assert clip.indices == again.indices and decoded_codes(clip.pixels) == clip.indices
        assert clip.indices == list(range(clip.indices[0], clip.indices[0] + 13, 3)) and clip.indices[0] <= 15
        starts.add(clip.indices[0])
    assert len(starts) > 2
    # Too short for every bucket: a ValueError naming the counts.
    with pytest.raises(ValueError, match="clip too short: 10 frames at step 3"):
        read_clip(source, DataConfig(frames=13, height=32, width=32, stride=3), train=False)


def test_read_clip_resizes_and_center_crops(tmp_path):
    # A 48x80 video with a bright vertical bar at columns 36..43 (the center): after cover-resize to
    # 32x53 and a center crop of 32x32 the bar sits at the center, 3.2 px wide.
    frames = np.zeros((9, 48, 80, 3), np.uint8)
    frames[:, :, 36:44] = 255
    path = str(write_video(tmp_path / "bar.mp4", frames, fps=8))
    clip = read_clip(ClipSource("bar", path, "c"), DataConfig(frames=5, height=32, width=32), train=False)
    assert clip.pixels.shape == (3, 5, 32, 32) and clip.bucket == (5, 32, 32)
    assert clip.pixels.min() >= -1 and clip.pixels.max() <= 1
    profile = clip.pixels.mean(dim=(0, 1, 2))  # [W]
    bright = (profile > 0).nonzero().flatten().tolist()
    assert bright and min(bright) >= 13 and max(bright) <= 18  # bar maps to x in [13.9, 17.2)
    # Buckets: a landscape clip picks the landscape bucket.
    cfg = DataConfig(buckets=[[5, 32, 32], [5, 32, 48], [5, 48, 32]])
    assert read_clip(ClipSource("bar", path, "c"), cfg, train=False).pixels.shape == (3, 5, 32, 48)


def test_read_clip_refuses_frames_decord_misdecodes(tmp_path):
    # decord 0.6 returns 4-channel garbage for 48-px-wide videos (a real mp4, real decord): a clear reason
    # (a counted skip in the cache), never a silently wrong clip.
    path = str(write_video(tmp_path / "w48.mp4", np.full((5, 32, 48, 3), 128, np.uint8), fps=8))
    with pytest.raises(ValueError, match="decord decodes this 48x32 video as 4-channel frames"):
        read_clip(ClipSource("w48", path, "c"), DataConfig(frames=5, height=32, width=32), train=False)


def test_read_clip_bad_files(tmp_path):
    cfg = DataConfig(frames=5, height=32, width=32)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    for name in ("empty.mp4", "noise.mp4", "missing.mp4"):
        with pytest.raises(ValueError, match="cannot open video"):
            read_clip(ClipSource(name, str(tmp_path / name), "c"), cfg, train=False)


def _write_folder(root):
    coded_video(root / "good.mp4", 9)
    (root / "good.txt").write_text("  a good\nclip ")
    coded_video(root / "sub" / "nested.mov", 9)
    (root / "sub" / "nested.txt").write_text("nested clip")
    coded_video(root / "nocap.mp4", 9)
    coded_video(root / "emptycap.mp4", 9)
    (root / "emptycap.txt").write_text(" \n")
    coded_video(root / "latin1.mp4", 9)
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    coded_video(root / "dup.mp4", 9)
    (root / "dup.webm").write_bytes((root / "dup.mp4").read_bytes())  # same stem, shares dup.txt
    (root / "dup.txt").write_text("duplicate")
    (root / "anim.gif").write_bytes(b"GIF89a")
    (root / "anim.txt").write_text("a gif")


def test_discover_folder_and_every_bad_input(tmp_path):
    _write_folder(tmp_path)
    clips, skips = discover(tmp_path)
    assert [c.key for c in clips] == ["dup", "good", "sub/nested"]
    assert clips[1].caption == "a good clip" and clips[0].path.endswith("dup.mp4")
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in skips}
    assert reasons == {
        "anim.gif": reasons["anim.gif"],
        "nocap.mp4": "missing caption nocap.txt",
        "emptycap.mp4": "caption emptycap.txt is empty",
        "latin1.mp4": reasons["latin1.mp4"],
        "dup.webm": reasons["dup.webm"],
    }
    assert "unsupported extension '.gif'" in reasons["anim.gif"]
    assert "not UTF-8" in reasons["latin1.mp4"] and "duplicate stem 'dup'" in reasons["dup.webm"]
    with pytest.raises(BadInputError, match="nocap.mp4: missing caption"):
        report_skip(Skip(str(tmp_path / "nocap.mp4"), "missing caption nocap.txt"), strict=True)


def test_discover_csv_and_jsonl_metadata(tmp_path):
    coded_video(tmp_path / "videos" / "a.mp4", 9)
    rows = [
        "path,caption,start,end",
        "videos/a.mp4,whole clip,,",
        "videos/a.mp4,first second,0,1",
        "videos/a.mp4,bad span,2,1",
        "videos/a.mp4,bad start,abc,",
        ",no path,,",
        "videos/missing.mp4,gone,,",
        "videos/a.txt,not a video,,",
        "videos/a.mp4,,,",
        "videos/a.mp4,too,many,fields,here",
    ]
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    clips, skips = discover(tmp_path / "meta.csv")
    assert [(c.key, c.caption, c.start, c.end) for c in clips] == [
        ("videos/a", "whole clip", None, None),
        ("videos/a@0-1", "first second", 0.0, 1.0),
    ]
    reasons = [s.reason for s in skips]
    assert len(skips) == 7
    for expected in ("end=1.0 <= start=2.0", "bad start/end", "missing 'path'", "file not found",
                     "unsupported extension '.txt'", "missing or empty caption", "more fields than the header"):  # fmt: skip
        assert any(expected in r for r in reasons), (expected, reasons)
    assert all(s.path.startswith(str(tmp_path / "meta.csv")) for s in skips)

    lines = [
        json.dumps({"path": "videos/a.mp4", "caption": "json clip", "start": 0.5}),
        "{not json",
        "[1, 2]",
    ]
    (tmp_path / "meta.jsonl").write_text("\n".join(lines) + "\n")
    clips, skips = discover(tmp_path / "meta.jsonl")
    assert [(c.key, c.start) for c in clips] == [("videos/a@0.5-end", 0.5)]
    assert ["invalid JSON" in skips[0].reason, "not a JSON object" in skips[1].reason] == [True, True]
    with pytest.raises(FileNotFoundError, match="data.source"):
        discover(tmp_path / "nothing_here")


def test_write_read_video_round_trip(tmp_path):
    t = torch.linspace(0, 1, 9).view(1, 9, 1, 1)
    y = torch.linspace(-1, 1, 30).view(1, 1, 30, 1)
    x = torch.linspace(-1, 1, 33).view(1, 1, 1, 33)
    channels = [0.8 * x * t, 0.8 * y + 0 * t, 0.5 * x * y + 0.1 * t]
    video = torch.cat([c.expand(1, 9, 30, 33) for c in channels])  # [3, F, H, W]
    path = write_video(tmp_path / "out" / "smooth.mp4", video, fps=8)
    frames = read_video(path)
    assert frames.shape == (9, 30, 34, 3) and frames.dtype == np.uint8  # odd width padded to even
    back = torch.from_numpy(frames[:, :, :33]).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert (back - video).abs().mean() < 0.03
    assert sorted(p.name for p in path.parent.iterdir()) == ["smooth.mp4"]  # no temporary left behind
    with pytest.raises(ValueError, match="must end in one of"):
        write_video(tmp_path / "clip.webm", video, fps=8)
    with pytest.raises(ValueError, match=r"\[C, F, H, W\] float or \[F, H, W, C\] uint8"):
        write_video(tmp_path / "bad.mp4", torch.zeros(9, 30, 33), fps=8)


def test_bucket_batch_sampler_no_mixing_sharding_determinism():
    shapes = [(4, 5, 8, 8)] * 7 + [(4, 3, 8, 16)] * 4 + [(4, 5, 16, 8)] * 2
    world = 3
    per_rank = [
        list(BucketBatchSampler(shapes, 2, shuffle=True, seed=1, rank=r, world_size=world))
        for r in range(world)
    ]
    assert len({len(b) for b in per_rank}) == 1  # equal step counts on every rank
    all_batches = [batch for batches in per_rank for batch in batches]
    assert all(len({shapes[i] for i in batch}) == 1 for batch in all_batches)
    assert sorted({i for batch in all_batches for i in batch}) == list(range(len(shapes)))
    sampler = BucketBatchSampler(shapes, 2, shuffle=True, seed=1, rank=0, world_size=world)
    assert list(sampler) == per_rank[0] and list(sampler) != per_rank[0]  # next epoch reshuffles
    sampler.set_epoch(0)
    assert list(sampler) == per_rank[0]
    other_seed = list(BucketBatchSampler(shapes, 2, shuffle=True, seed=2, rank=0, world_size=world))
    assert other_seed != per_rank[0]
    ordered = list(BucketBatchSampler(shapes, 4, shuffle=False, drop_last=True))
    assert ordered == [[7, 8, 9, 10], [0, 1, 2, 3]]  # buckets in shape order, incomplete batches dropped


def test_demo_dataset_clips_move_as_captioned(tmp_path):
    """The demo clips are real mp4s whose camera motion matches the caption (phase correlation)."""
    from skimage.registration import phase_cross_correlation

    from scripts.make_demo_dataset import make_demo_dataset

    paths, written = make_demo_dataset(tmp_path, frames=9, size=64, fps=8, num_photos=1, motions_per_photo=3)
    assert written == 3
    assert [p.name for p in paths] == [
        "astronaut_pan_right.mp4",
        "astronaut_pan_left.mp4",
        "astronaut_pan_down.mp4",
    ]
    shifts = {}
    for path in paths:
        video = read_video(path).mean(-1)  # [F, H, W] grey
        assert video.shape == (9, 64, 64)
        shifts[path.stem] = phase_cross_correlation(video[0], video[4])[0].tolist()  # (dy, dx) of frame 4
        caption = path.with_suffix(".txt").read_text()
        assert "astronaut" in caption and path.stem.split("_")[-1] in caption
    # A pan of 0.7 photo units over 8 frames at 1.2 units per 64 px moves 18.7 px in 4 frames.
    assert shifts == {
        "astronaut_pan_right": [0.0, 19.0],
        "astronaut_pan_left": [0.0, -19.0],
        "astronaut_pan_down": [19.0, 0.0],
    }


def test_demo_dataset_rerun_keeps_complete_clips(tmp_path):
    """A second run rewrites nothing (same bytes and mtimes), clears a killed run's half-written files,
    and rewrites exactly the clips that are not what the options ask for."""
    from scripts.make_demo_dataset import make_demo_dataset

    options = dict(frames=9, size=32, fps=8, num_photos=1, motions_per_photo=3)
    paths, _ = make_demo_dataset(tmp_path, **options)
    files = sorted(tmp_path.iterdir())
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    (tmp_path / ".astronaut_pan_left.tmp999.mp4").write_bytes(b"half a video")  # a run killed mid-write
    assert make_demo_dataset(tmp_path, **options) == (paths, 0)
    assert sorted(tmp_path.iterdir()) == files
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files} == before

    paths[1].write_bytes(before[paths[1]][0][:500])  # truncated (e.g. copied partially)
    paths[2].with_suffix(".txt").write_text("another caption")
    assert make_demo_dataset(tmp_path, **options) == (paths, 2)
    assert read_video(paths[1]).shape == (9, 32, 32, 3)  # whole again (mp4 bytes may differ by machine)
    assert paths[2].with_suffix(".txt").read_bytes() == before[paths[2].with_suffix(".txt")][0]
    assert paths[0].stat().st_mtime_ns == before[paths[0]][1]
    _, written = make_demo_dataset(tmp_path, **{**options, "frames": 13})  # other options: all rewritten
    assert written == 3 and read_video(paths[0]).shape == (13, 32, 32, 3)
