"""Benchmark the data path on this machine: decoded clips/s (decord + resize/crop) and cached samples/s
(the training loader), each with 0 workers (the baseline, same run) and with N workers, plus the data
wait per step while a simulated training step of --step-ms runs (the trainer's `data_wait`).

    python scripts/bench_data.py                                    # the demo cache, workers 0 and 2
    python scripts/bench_data.py --cache-dir outputs/cache/folder --workers 8 --batch-size 4 --step-ms 500

The cache must exist (scripts/cache_latents.py); its manifest supplies the source and the sampling
settings, so the decode benchmark reads the same clips the same way.
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data.cache import DecodeDataset, no_collate  # noqa: E402
from data.config import DataConfig  # noqa: E402
from data.loader import build_dataloader  # noqa: E402
from data.sources import discover  # noqa: E402


def decode_rate(cfg: DataConfig, num_clips: int) -> float:
    """Clips decoded per second through the caching path's loader with ``cfg.decode_workers``."""
    clips = discover(cfg.source)[0][:num_clips]
    loader = torch.utils.data.DataLoader(
        DecodeDataset(clips, cfg), batch_size=None, num_workers=cfg.decode_workers, collate_fn=no_collate
    )
    start = time.perf_counter()
    count = sum(1 for _ in loader)
    return count / (time.perf_counter() - start)


def cached_rate(cfg: DataConfig, batch_size: int, epochs: int, step_s: float) -> tuple[float, float]:
    """(samples/s with no compute, data wait as a fraction of a simulated ``step_s`` training step)."""
    loader = build_dataloader(cfg, "train", batch_size=batch_size)
    next(iter(loader))  # start workers outside the timing
    samples, start = 0, time.perf_counter()
    for _ in range(epochs):
        samples += sum(len(batch["key"]) for batch in loader)
    rate = samples / (time.perf_counter() - start)
    wait = busy = 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        for _batch in loader:
            t1 = time.perf_counter()
            wait += t1 - t0
            time.sleep(step_s)  # stands in for the GPU step, during which workers prefetch
            t0 = time.perf_counter()
            busy += t0 - t1
    return rate, wait / max(busy + wait, 1e-9)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache-dir", default=DataConfig().cache_dir, help="latent cache (default: the demo's)"
    )
    parser.add_argument("--workers", type=int, default=2, help="loader workers to compare with 0 (default 2)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--clips", type=int, default=16, help="clips to decode (default 16)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the cache (default 3)")
    parser.add_argument(
        "--step-ms", type=float, default=100.0, help="simulated training step (default 100 ms)"
    )
    args = parser.parse_args(argv)

    manifest = json.loads((Path(args.cache_dir) / "manifest.json").read_text())
    cfg = DataConfig(cache_dir=args.cache_dir, **manifest["producer"]["data"])
    print(
        f"{torch.get_num_threads()} torch threads; source {cfg.source}; cache {cfg.cache_dir}; batch {args.batch_size}"
    )
    print(
        f"{'workers':>8} {'decoded clips/s':>16} {'cached samples/s':>17} {'data wait':>10}  (ratio vs 0 workers)"
    )
    base = None
    for workers in (0, args.workers):
        run = replace(cfg, num_workers=workers, decode_workers=workers)
        decoded = decode_rate(run, args.clips)
        cached, wait = cached_rate(run, args.batch_size, args.epochs, args.step_ms / 1000)
        base = base or (decoded, cached)
        print(f"{workers:>8} {decoded:>16.2f} {cached:>17.1f} {wait:>9.2%}  "
              f"(decode x{decoded / base[0]:.2f}, cached x{cached / base[1]:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
