"""data.cache + data.loader: caching real mp4s through a tiny VAE / UMT5 loaded with from_pretrained,
bad inputs at decode time, resume after an interrupted run, rank sharding, stale-cache refusal."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import data.cache
import data.sources
from data import DataConfig, build_dataloader
from data.cache import StaleCacheError, cache_dataset, load_manifest, producer_description
from data.sources import BadInputError
from data.video_io import read_video, write_video
from models.encoders import TextEncoderConfig, VAEConfig, build_text_encoder, build_vae, encode_video

REPO = Path(__file__).resolve().parents[1]
GOOD = {  # key -> (frames, height, width, caption)
    "cat": (9, 32, 32, "a cat"),
    "dog": (12, 32, 32, "a dog running"),
    "sea": (9, 32, 64, "the sea at night"),
    "sub/sky": (10, 32, 64, "clouds in the sky"),
    "tree": (9, 32, 32, "a green tree"),
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Tiny VAE + text encoder saved with save_pretrained; configs that load them with from_pretrained."""
    root = tmp_path_factory.mktemp("pipeline")
    build_vae(VAEConfig()).save_pretrained(root / "vae")
    text = build_text_encoder(TextEncoderConfig(max_length=8))
    text.model.save_pretrained(root / "text_encoder")
    text.tokenizer.save_pretrained(root / "tokenizer")
    vae_cfg = VAEConfig(arch=None, pretrained=str(root), subfolder="vae")
    text_cfg = TextEncoderConfig(arch=None, pretrained=str(root), subfolder="text_encoder",
                                 tokenizer_subfolder="tokenizer", max_length=8)  # fmt: skip
    return vae_cfg, text_cfg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Real mp4s of blocky random content (8x8 blocks) plus one file for each decode-time failure."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for key, (frames, height, width, caption) in GOOD.items():
        coarse = rng.integers(0, 256, (frames, height // 8, width // 8, 3)).astype(np.uint8)
        video = coarse.repeat(8, axis=1).repeat(8, axis=2)  # blocky, so the codec keeps it nearly exact
        write_video(root / f"{key}.mp4", video, fps=8)
        (root / f"{key}.txt").write_text(caption)
    good = (root / "cat.mp4").read_bytes()
    bad = {"truncated": good[: len(good) // 3], "zero": b"", "corrupt": rng.bytes(4000)}
    for name, payload in bad.items():
        (root / f"{name}.mp4").write_bytes(payload)
        (root / f"{name}.txt").write_text(f"a {name} file")
    write_video(root / "short.mp4", np.zeros((4, 32, 32, 3), np.uint8), fps=8)  # 4 < 5 frames
    (root / "short.txt").write_text("too short")
    (root / "nocaption.mp4").write_bytes(good)
    return root


def make_cfg(dataset, cache_dir, **overrides):
    fields = dict(source=str(dataset), cache_dir=str(cache_dir), buckets=[[5, 32, 32], [9, 32, 32], [9, 32, 64]],
                  val_keys=["tree"], shard_size=2, num_workers=0)  # fmt: skip
    return DataConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def cached(pipeline, dataset, tmp_path_factory):
    """A complete cache of the dataset (one rank)."""
    cfg = make_cfg(dataset, tmp_path_factory.mktemp("cache"))
    manifest = cache_dataset(*pipeline, cfg, progress=False)
    return cfg, manifest


def read_samples(cache_dir) -> dict[str, dict[str, torch.Tensor]]:
    """Every cached sample by key, read straight from the shards named in manifest.json."""
    manifest = json.loads((Path(cache_dir) / "manifest.json").read_text())
    samples = {}
    for shard in manifest["shards"]:
        with safe_open(str(Path(cache_dir) / shard["file"]), framework="pt") as f:
            for item in shard["items"]:
                samples[item["key"]] = {
                    k: f.get_tensor(f"{item['index']}.{k}") for k in ("latents", "text_emb", "text_mask")
                }
    return samples


def test_cache_contents_against_float64_reference(cached, pipeline, dataset):
    cfg, manifest = cached
    merged = json.loads((Path(cfg.cache_dir) / "manifest.json").read_text())
    assert merged["num_samples"] == len(GOOD) and merged["producer"] == producer_description(*pipeline, cfg)
    items = {item["key"]: item for shard in merged["shards"] for item in shard["items"]}
    assert set(items) == set(GOOD)
    assert {k: tuple(v["bucket"]) for k, v in items.items()} == {
        "cat": (9, 32, 32), "dog": (9, 32, 32), "sea": (9, 32, 64), "sub/sky": (9, 32, 64), "tree": (9, 32, 32),
    }  # fmt: skip
    assert [items[k]["split"] for k in sorted(items)] == ["train"] * 4 + ["val"]
    assert all(len(s["items"]) <= 2 for s in merged["shards"])

    # "tree" is validation: frames 0..8, no resize (32x32 source), so the reference pixels come straight
    # from decord; encode them with a float64 copy of the VAE.
    samples = read_samples(cfg.cache_dir)
    assert items["tree"]["frame_indices"] == list(range(9))
    pixels = torch.from_numpy(read_video(dataset / "tree.mp4")[:9]).permute(3, 0, 1, 2).double() / 127.5 - 1
    ref = encode_video(build_vae(pipeline[0]).double(), pixels[None])[0]
    assert samples["tree"]["latents"].shape == (4, 3, 4, 4)
    torch.testing.assert_close(samples["tree"]["latents"].double(), ref, atol=1e-4, rtol=1e-4)
    emb, mask = build_text_encoder(pipeline[1]).encode(["a green tree"])
    torch.testing.assert_close(samples["tree"]["text_emb"], emb[0])
    assert samples["tree"]["text_mask"].tolist() == mask[0].tolist() == [True] * 4 + [False] * 4


def test_bad_inputs_are_skipped_and_listed(cached, dataset):
    cfg, _ = cached
    merged = json.loads((Path(cfg.cache_dir) / "manifest.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in merged["skipped"]}
    assert set(reasons) == {"truncated.mp4", "zero.mp4", "corrupt.mp4", "short.mp4", "nocaption.mp4"}
    assert merged["num_skipped"] == 5
    assert "cannot open video" in reasons["zero.mp4"] and "cannot open video" in reasons["corrupt.mp4"]
    assert "cannot open video" in reasons["truncated.mp4"] or "decode failed" in reasons["truncated.mp4"]
    assert reasons["short.mp4"].startswith("clip too short: 4 frames") and "needs 5" in reasons["short.mp4"]
    assert reasons["nocaption.mp4"] == "missing caption nocaption.txt"


def test_strict_raises_naming_the_file(pipeline, dataset, tmp_path):
    with pytest.raises(BadInputError, match=r"nocaption\.mp4: missing caption"):
        cache_dataset(*pipeline, make_cfg(dataset, tmp_path, strict=True), progress=False)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "corrupt.mp4").write_bytes((dataset / "corrupt.mp4").read_bytes())
    (only_bad / "corrupt.txt").write_text("broken")
    with pytest.raises(BadInputError, match=r"corrupt\.mp4: cannot open video"):
        cache_dataset(*pipeline, make_cfg(only_bad, tmp_path / "c2", strict=True), progress=False)


def test_loader_batches(cached):
    cfg, _ = cached
    reference = read_samples(cfg.cache_dir)
    loader = build_dataloader(cfg, "train", batch_size=2, seed=3)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == ["cat", "dog", "sea", "sub/sky"]
    for batch in batches:
        assert batch["latents"].ndim == 5 and batch["text_emb"].shape[1:] == (8, 32)
        assert batch["text_mask"].dtype == torch.bool and len(batch["caption"]) == len(batch["key"])
        for i, key in enumerate(batch["key"]):  # one bucket per batch, and each row is its key's sample
            torch.testing.assert_close(batch["latents"][i], reference[key]["latents"], atol=0, rtol=0)
            assert batch["caption"][i] == GOOD[key][3]
    assert [b["key"] for b in build_dataloader(cfg, "train", batch_size=2, seed=3)] == [
        b["key"] for b in batches
    ]
    assert [b["key"] for b in build_dataloader(cfg, "val", batch_size=4)] == [["tree"]]
    # Worker processes open their own memory-mapped shard handles and yield the same batches.
    workers = build_dataloader(replace(cfg, num_workers=2), "train", batch_size=2, seed=3)
    assert [b["key"] for b in workers] == [b["key"] for b in batches]
    # Two ranks: disjoint, equal-length shards of the batches.
    ranks = [
        [b["key"] for b in build_dataloader(cfg, "train", batch_size=1, rank=r, world_size=2)] for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 2 and sorted(sum(ranks[0] + ranks[1], [])) == sorted(keys)


def test_stale_or_mismatched_cache_is_refused(cached, pipeline, dataset, tmp_path):
    cfg, _ = cached
    with pytest.raises(StaleCacheError, match=r"data\.buckets: cache .* != config") as err:
        build_dataloader(replace(cfg, buckets=[[9, 32, 32]]), "train", batch_size=1)
    assert "scripts/cache_latents.py" in str(err.value) and "+overwrite=true" in str(err.value)
    other_text = replace(pipeline[1], max_length=16)
    with pytest.raises(StaleCacheError, match=r"text_encoder\.max_length: cache 8 != config 16"):
        build_dataloader(
            cfg, "train", batch_size=1, producer=producer_description(pipeline[0], other_text, cfg)
        )
    with pytest.raises(StaleCacheError, match=r"vae\.dtype"):
        cache_dataset(replace(pipeline[0], dtype="bfloat16"), pipeline[1], cfg, progress=False)
    with pytest.raises(StaleCacheError, match="does not exist"):
        build_dataloader(replace(cfg, cache_dir=str(tmp_path / "none")), "train", batch_size=1)
    # Changing the inputs (a re-captioned clip) makes the cache stale.
    moved = tmp_path / "videos"
    moved.mkdir()
    for name in ("cat", "tree"):
        (moved / f"{name}.mp4").write_bytes((dataset / f"{name}.mp4").read_bytes())
        (moved / f"{name}.txt").write_text(GOOD[name][3])
    small = replace(cfg, source=str(moved), cache_dir=str(tmp_path / "small"))
    cache_dataset(*pipeline, small, progress=False)
    assert len(load_manifest(small.cache_dir, small)["shards"]) == 1
    (moved / "cat.txt").write_text("a black cat")
    with pytest.raises(StaleCacheError, match=r"inputs that changed.*\n    modified: cat \(.*/cat\.mp4\): "
                       r"caption 'a cat' -> 'a black cat'\n"):  # fmt: skip
        build_dataloader(small, "train", batch_size=1)


def test_resume_after_interrupt_matches_uninterrupted_run(cached, pipeline, dataset, tmp_path, monkeypatch):
    cfg = replace(cached[0], cache_dir=str(tmp_path / "cache"))
    calls = []
    real_encode = data.cache.encode_video

    def crash_on_fourth(vae, pixels):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second shard
        return real_encode(vae, pixels)

    monkeypatch.setattr(data.cache, "encode_video", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        cache_dataset(*pipeline, cfg, progress=False)
    part = json.loads((tmp_path / "cache" / "manifest-000-of-001.json").read_text())
    assert not part["complete"] and [len(s["items"]) for s in part["shards"]] == [2]
    assert sorted(p.name for p in (tmp_path / "cache").glob("shard-*")) == ["shard-000-00000.safetensors"]
    with pytest.raises(StaleCacheError, match="incomplete"):
        build_dataloader(cfg, "train", batch_size=1)

    calls.clear()
    monkeypatch.setattr(
        data.cache, "encode_video", lambda vae, pixels: calls.append(1) or real_encode(vae, pixels)
    )
    cache_dataset(*pipeline, cfg, progress=False)
    assert len(calls) == len(GOOD) - 2  # finished items are not redone
    resumed, reference = read_samples(cfg.cache_dir), read_samples(cached[0].cache_dir)
    assert set(resumed) == set(reference)
    for key in reference:
        for name in ("latents", "text_emb", "text_mask"):
            torch.testing.assert_close(resumed[key][name], reference[key][name], atol=0, rtol=0)
    calls.clear()
    cache_dataset(*pipeline, cfg, progress=False)  # a complete cache: nothing to do
    assert calls == []


def test_rank_sharding_and_hydra_entry_point(cached, pipeline, dataset, tmp_path):
    """Rank 1 of 2 caches in-process; rank 0 runs scripts/cache_latents.py (Hydra, RANK / WORLD_SIZE env)
    into the same folder, and the merged manifest appears once both are done."""
    if not (REPO / "configs" / "train.yaml").exists():
        pytest.skip("configs/train.yaml (the trainer's primary config) is not there yet")
    vae_cfg, text_cfg = pipeline
    cache_dir = tmp_path / "cache"
    cfg = replace(cached[0], cache_dir=str(cache_dir))
    part = cache_dataset(vae_cfg, text_cfg, cfg, rank=1, world_size=2, progress=False)
    assert part["num_inputs"] == 4 and not (cache_dir / "manifest.json").exists()  # every 2nd of 9 inputs
    overrides = [
        "model.vae.arch=null", f"model.vae.pretrained={vae_cfg.pretrained}", "model.vae.subfolder=vae",
        "model.text_encoder.arch=null", f"model.text_encoder.pretrained={text_cfg.pretrained}",
        "model.text_encoder.subfolder=text_encoder", "model.text_encoder.tokenizer_subfolder=tokenizer",
        "model.text_encoder.max_length=8", f"data.source={dataset}", f"data.cache_dir={cache_dir}",
        "data.buckets=[[5,32,32],[9,32,32],[9,32,64]]", "data.val_keys=[tree]", "data.shard_size=2",
        "data.stride=null", "data.train_crop=center", "data.val_fraction=0.1", f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, "scripts/cache_latents.py", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2: 3 samples cached" in done.stdout and (cache_dir / "manifest.json").exists()
    shards = read_samples(cache_dir)
    reference = read_samples(cached[0].cache_dir)
    assert set(shards) == set(reference)
    for key in reference:
        torch.testing.assert_close(shards[key]["latents"], reference[key]["latents"], atol=0, rtol=0)
    assert sorted(k for b in build_dataloader(cfg, "train", batch_size=2) for k in b["key"]) == [
        "cat",
        "dog",
        "sea",
        "sub/sky",
    ]


def test_rerun_of_dataset_and_cache_is_clean_and_content_changes_are_named(pipeline, tmp_path, monkeypatch):
    """What a second `make demo` does (dataset step, then the cache step and the loader's check) passes
    without rewriting anything; a touch is no change; new content, a removed/added clip and a producer
    setting are each named in the `StaleCacheError`."""
    from scripts.make_demo_dataset import make_demo_dataset

    source = tmp_path / "dataset"
    options = dict(frames=9, size=32, fps=8, num_photos=2, motions_per_photo=1)
    paths, _ = make_demo_dataset(source, **options)  # astronaut_pan_right, coffee_pan_left
    cfg = make_cfg(source, tmp_path / "cache", buckets=[[9, 32, 32]], val_keys=[])
    cache_dataset(*pipeline, cfg, progress=False)
    shards = {p: p.stat().st_mtime_ns for p in Path(cfg.cache_dir).glob("shard-*")}
    clips = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}

    digests = []  # content reads: only for files whose size or mtime changed since caching
    real_digest = data.sources.content_digest
    monkeypatch.setattr(data.sources, "content_digest", lambda *a: digests.append(a[0]) or real_digest(*a))
    assert make_demo_dataset(source, **options) == (paths, 0)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths} == clips
    cache_dataset(*pipeline, cfg, progress=False)  # resumes a complete cache: nothing to do, no error
    assert len(build_dataloader(cfg, "train", batch_size=1)) == 2 and digests == []
    assert {p: p.stat().st_mtime_ns for p in Path(cfg.cache_dir).glob("shard-*")} == shards

    os.utime(paths[0], ns=(1, 1))  # touched (or copied without mtimes): the same content
    load_manifest(cfg.cache_dir, cfg)
    cache_dataset(*pipeline, cfg, progress=False)
    assert digests == [str(paths[0])] * 2  # re-read once by each check, then found unchanged

    key = paths[1].stem
    write_video(paths[1], np.full((9, 32, 32, 3), 200, np.uint8), fps=8)  # new content, same name
    for check in (
        lambda: load_manifest(cfg.cache_dir, cfg),
        lambda: cache_dataset(*pipeline, cfg, progress=False),
    ):
        with pytest.raises(StaleCacheError, match=rf"\n    modified: {key} \(.*{key}\.mp4\): content changed "
                           r"\(size \d+ -> \d+ bytes\)\n") as err:  # fmt: skip
            check()
        assert "astronaut" not in str(err.value) and "producer settings" not in str(err.value)

    paths[1].unlink()
    (source / "extra.mp4").write_bytes(clips[paths[0]][0])
    (source / "extra.txt").write_text("an extra clip")
    with pytest.raises(StaleCacheError) as err:
        build_dataloader(replace(cfg, seed=1), "train", batch_size=1)
    message = str(err.value)
    assert "producer settings that changed:\n    data.seed: cache 0 != config 1\n" in message
    assert f"\n    added: extra ({source / 'extra.mp4'})\n" in message
    assert f"\n    removed: {key} ({paths[1]})\n" in message and "+overwrite=true" in message


def test_missing_or_truncated_shard_fails_validation_and_rerun_repairs_it(
    cached, pipeline, tmp_path, monkeypatch
):
    cfg = replace(cached[0], cache_dir=str(tmp_path / "cache"))
    shutil.copytree(cached[0].cache_dir, cfg.cache_dir)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    lost, cut = (tmp_path / "cache" / s["file"] for s in manifest["shards"][:2])  # of 3 shards
    lost.unlink()
    cut.write_bytes(cut.read_bytes()[:-100])
    # Every rank validates every shard when its loader is built, so all fail together before step 0.
    with pytest.raises(StaleCacheError, match="missing shards") as err:
        build_dataloader(cfg, "val", batch_size=1, rank=1, world_size=2)
    assert f"\n  {lost} (missing)\n" in str(err.value)
    assert f"\n  {cut} ({cut.stat().st_size} bytes, manifest says {cut.stat().st_size + 100})\n" in str(
        err.value
    )
    assert "re-run `python scripts/cache_latents.py" in str(err.value)

    calls = []
    real_encode = data.cache.encode_video
    monkeypatch.setattr(data.cache, "encode_video", lambda vae, px: calls.append(1) or real_encode(vae, px))
    cache_dataset(*pipeline, cfg, progress=False)  # the fix the message gives: re-encodes those clips only
    assert len(calls) == sum(len(s["items"]) for s in manifest["shards"][:2])
    repaired, reference = read_samples(cfg.cache_dir), read_samples(cached[0].cache_dir)
    assert set(repaired) == set(reference)
    for key in reference:
        torch.testing.assert_close(repaired[key]["latents"], reference[key]["latents"], atol=0, rtol=0)
    # New shards are numbered after the kept one, never over it.
    names = [s["file"] for s in load_manifest(cfg.cache_dir, cfg)["shards"]]
    assert names == [f"shard-000-0000{i}.safetensors" for i in (2, 3, 4)] and not cut.exists()


def test_empty_or_unusable_source_fails_naming_the_folder(pipeline, dataset, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"data.source='{empty}' has no usable clip.*: 0 inputs skipped"):
        cache_dataset(*pipeline, make_cfg(empty, tmp_path / "c1"), progress=False)
    (empty / "nocaption.mp4").write_bytes((dataset / "cat.mp4").read_bytes())
    with pytest.raises(
        ValueError, match=r"1 inputs skipped\n  .*nocaption\.mp4: missing caption nocaption.txt"
    ):
        cache_dataset(*pipeline, make_cfg(empty, tmp_path / "c2"), progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "zero.mp4").write_bytes(b"")
    (broken / "zero.txt").write_text("nothing")
    with pytest.raises(ValueError, match=rf"none of the 1 clips in data.source='{broken}' could be cached"):
        cache_dataset(*pipeline, make_cfg(broken, tmp_path / "c3"), progress=False)


def test_batch_size_larger_than_the_split_warns_once(cached, caplog):
    cfg, _ = cached
    with caplog.at_level("WARNING", logger="data.loader"):
        loader = build_dataloader(cfg, "train", batch_size=10)
        assert [len(b["key"]) for epoch in range(2) for b in loader] == [2, 2, 2, 2]  # two buckets of 2
        build_dataloader(cfg, "train", batch_size=4)
        build_dataloader(cfg, "train", batch_size=10, rank=1, world_size=2)  # rank 0 says it
    warnings = [r.getMessage() for r in caplog.records if r.name == "data.loader"]
    assert warnings == [
        f"batch_size=10 is larger than the 4 train samples in {cfg.cache_dir}: batches will hold at most 4 samples"
    ]
    with pytest.raises(ValueError, match=r"drop_last with batch_size=3: .* \(largest: 2\)"):
        build_dataloader(cfg, "train", batch_size=3, drop_last=True)
