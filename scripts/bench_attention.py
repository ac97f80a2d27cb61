"""Benchmark VMoBA attention against dense SDPA (cuDNN, flash, efficient) in one process.

For each grid, times forward and forward+backward (median of CUDA-event timings) and peak memory of
dense SDPA with each backend that runs, then of VMoBA in every requested mode: top-k at fixed densities
and the threshold rule (its realised density is reported), each at block and/or token granularity.
VMoBA's time includes partition, gating/selection, BlockMask build, the kernel and unpartition; the
gate (partition + selection) and the mask build are also timed on their own. Prints one table per grid
with ratios against cuDNN and against the fastest dense kernel; --out appends JSON lines.

Example (the issue's default case, an H100):
    PYTHONPATH=. python scripts/bench_attention.py --grids 24x36x64 --densities 0.25 0.125 --threshold 0.25
Tuning FlexAttention kernel options (one variant per JSON):
    python scripts/bench_attention.py --kernel-options '{}' '{"USE_TMA": true}' --granularities block
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from vmoba import KernelOptions, VMoBAConfig, block_layout, vmoba_attention  # noqa: E402
from vmoba import keyed as vkeyed  # noqa: E402
from vmoba.partition import partition_layout, valid_mask  # noqa: E402
from vmoba.selection import select  # noqa: E402
from vmoba.tiles import TILE, tile_tables  # noqa: E402

DENSE = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_grid(spec: str) -> tuple[int, int, int]:
    """A latent grid 'TxHxW' -> (T, H, W); also an argparse `type`."""
    try:
        grid = tuple(int(x) for x in spec.lower().split("x"))
    except ValueError:
        grid = ()
    if len(grid) != 3 or min(grid) <= 0:
        raise argparse.ArgumentTypeError(f"a grid is TxHxW in positive integers, e.g. 24x36x64; got {spec!r}")
    return grid


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--grids", nargs="+", default=["24x36x64"], help="latent grids TxHxW (default: 24x36x64 = 55,296)"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--partition", choices=["1d", "2d", "3d"], default="3d")
    p.add_argument(
        "--block", type=int, nargs="+", default=[4, 4, 8], help="block of --partition (default 4 4 8)"
    )
    p.add_argument("--densities", type=float, nargs="*", default=[0.25, 0.125], help="top-k densities")
    p.add_argument("--threshold", type=float, nargs="*", default=[0.25], help="threshold-mode taus")
    p.add_argument("--granularities", nargs="+", choices=["block", "token"], default=["block", "token"])
    p.add_argument(
        "--token-densities", type=float, nargs="*", default=[0.25], help="densities for token granularity"
    )
    p.add_argument(
        "--token-thresholds", type=float, nargs="*", default=[], help="threshold-mode taus, token granularity"
    )
    p.add_argument("--dense", nargs="*", choices=list(DENSE), default=list(DENSE), help="dense SDPA backends")
    p.add_argument(
        "--backends",
        nargs="+",
        choices=["flex", "fa4", "keyed"],
        default=["flex", "fa4", "keyed"],
        help="VMoBA kernels (fa4 rows report why where it cannot run)",
    )
    p.add_argument(
        "--fa4-backward-groups",
        type=int,
        nargs="+",
        default=[0],
        help="KernelOptions.fa4_backward_head_groups per fa4 variant (0 = None: save block order, the default)",
    )
    p.add_argument(
        "--kernel-options",
        nargs="*",
        default=[None],
        help="FlexAttention kernel options, JSON each ('' = vmoba's tuned defaults, '{}' = FlexAttention's)",
    )
    p.add_argument(
        "--inputs", choices=["smooth", "random"], default="smooth", help="smooth: correlated neighbours"
    )
    p.add_argument(
        "--max-autotune",
        action="store_true",
        help="let Inductor autotune FlexAttention's tiles (slow compile)",
    )
    p.add_argument(
        "--profile", action="store_true", help="print each row's CUDA-time breakdown (torch profiler)"
    )
    p.add_argument("--skip-fwd", action="store_true", help="skip the forward-only timing (saves a compile)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=Path, help="append one JSON line per measurement")
    return p.parse_args(argv)


def timed(fn, warmup, iters) -> float:
    """Median milliseconds of `fn()` over `iters` runs, by CUDA events after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_gib(fn) -> float:
    """Peak allocated GiB during `fn()` above what was allocated before (inputs excluded)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def make_inputs(args, grid, dtype):
    """q, k, v [B, L, H, D]; "smooth" adds a coarse random field so neighbouring tokens correlate."""
    T, H, W = grid
    shape = (args.batch, T * H * W, args.heads, args.head_dim)
    tensors = []
    for _ in range(3):
        x = torch.randn(shape, device="cuda")
        if args.inputs == "smooth":
            coarse = torch.randn(
                args.batch, args.heads * args.head_dim, -(-T // 4), -(-H // 4), -(-W // 4), device="cuda"
            )
            field = torch.nn.functional.interpolate(coarse, size=(T, H, W), mode="trilinear")
            x = x + 2 * field.flatten(2).transpose(1, 2).reshape(shape)
        tensors.append((x / x.std()).to(dtype).requires_grad_())
    return tensors


def measure(name, fn, q, k, v, args) -> dict:
    grad = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

    start = time.perf_counter()
    try:  # forward+backward first: it is the number the targets are about
        row = {"kernel": name, "fwd_bwd_ms": timed(fwd_bwd, args.warmup, args.iters)}
        print(
            f"# {name}: fwd+bwd {row['fwd_bwd_ms']:.2f} ms after {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        row["peak_gib"] = peak_gib(fwd_bwd)
        if args.profile:
            print_profile(name, fwd_bwd)
        if not args.skip_fwd:
            row["fwd_ms"] = timed(fwd, args.warmup, args.iters)
    except Exception as err:  # a dense backend or kernel option that does not run here: report, go on
        row = {"kernel": name, "error": str(err).splitlines()[0][:120]}
    torch.cuda.empty_cache()
    row["wall_s"] = round(time.perf_counter() - start, 1)  # compile time included
    print(json.dumps(row), flush=True)
    return row


def print_profile(name: str, fn, iters: int = 3, rows: int = 12) -> None:
    """The CUDA-time breakdown (kernels, copies, gate ops) of `iters` calls of `fn`: the `rows` largest."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60
    )
    print(f"# profile of {name}, {iters} calls (divide totals by {iters}):\n{table}", flush=True)


def dense_fn(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return out.transpose(1, 2)

    return run


def vmoba_rows(args, grid, q, k, v):
    kind = args.partition
    block = args.block[0] if kind == "1d" else args.block
    modes = [("block", "topk", d) for d in args.densities if "block" in args.granularities]
    modes += [("block", "threshold", t) for t in args.threshold if "block" in args.granularities]
    modes += [("token", "topk", d) for d in args.token_densities if "token" in args.granularities]
    modes += [("token", "threshold", t) for t in args.token_thresholds if "token" in args.granularities]
    variants = [("fa4", groups) for groups in args.fa4_backward_groups] if "fa4" in args.backends else []
    if "flex" in args.backends:
        variants += [("flex", json.loads(o) if o else None) for o in args.kernel_options]
    if "keyed" in args.backends:
        variants.append(("keyed", None))
    for backend, options in variants:
        for granularity, selection, value in modes:
            layout = block_layout(grid, kind, block, TILE)
            budget = {f"topk_{kind}": max(1, round(value * layout.num_blocks))} if selection == "topk" else {}
            cfg = VMoBAConfig(
                partitions=[kind],
                **{f"block_{kind}": block},
                selection=selection,
                threshold=value if selection == "threshold" else 0.25,
                granularity=granularity,
                **budget,
            )
            # flex: options None = vmoba's tuned FlexAttention options for this GPU; fa4: backward head groups
            knobs = KernelOptions(
                flex_kernel_options=options if backend == "flex" else None,
                fa4_backward_head_groups=(options or None) if backend == "fa4" else None,
            )
            stats = {}
            label = f"vmoba {backend} {granularity} {selection}={value:g}"
            if options:
                label += f" {json.dumps(options)}" if backend == "flex" else f" bwd-groups={options}"
            row = measure(
                label,
                lambda q, k, v, cfg=cfg, stats=stats, backend=backend, knobs=knobs: vmoba_attention(
                    q, k, v, grid, cfg, backend=backend, stats=stats, options=knobs
                ),
                q,
                k,
                v,
                args,
            )
            if "error" not in row:
                row["density"] = stats["density"].mean().item()
                row.update(gate_and_mask_ms(cfg, kind, layout, q, k, args, backend))
                print(json.dumps(row), flush=True)
            yield row


def gate_and_mask_ms(cfg, kind, layout, q, k, args, backend: str) -> dict:
    """Times of partition + selection (the gate) and of what the backend builds from the selection on its
    own: tile tables (flex, fa4) or row lists (keyed)."""
    valid = valid_mask(layout, q.device)

    @torch.no_grad()
    def gate():
        qb, kb = (partition_layout(t, layout) for t in (q, k))
        return select(qb, kb, layout, valid, cfg, kind)

    sel = gate()
    build = vkeyed.row_lists if backend == "keyed" else tile_tables
    mask_ms = timed(lambda: build(sel, valid, layout.padded_volume), args.warmup, args.iters)
    return {"gate_ms": timed(gate, args.warmup, args.iters), "mask_ms": mask_ms}


def _ratio(base, ms) -> str:
    return f"{base / ms:.2f}" if base else "-"


def table(rows, L) -> str:
    ok = [r for r in rows if "error" not in r]
    cudnn = next((r["fwd_bwd_ms"] for r in ok if r["kernel"] == "sdpa cudnn"), None)
    fastest = min((r["fwd_bwd_ms"] for r in ok if r["kernel"].startswith("sdpa")), default=None)
    dense_peak = min((r["peak_gib"] for r in ok if r["kernel"].startswith("sdpa")), default=None)
    lines = [
        f"L = {L}",
        "| kernel | fwd ms | fwd+bwd ms | x cuDNN | x fastest dense | gate ms | mask ms | peak GiB | x dense peak | density |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | failed: {r['error']} | | | | | | | | |")
            continue
        ms = r["fwd_bwd_ms"]
        gate = f"{r['gate_ms']:.2f}" if "gate_ms" in r else "-"
        mask = f"{r['mask_ms']:.2f}" if "mask_ms" in r else "-"
        density = f"{r['density']:.3f}" if "density" in r else "1"
        peak = f"{r['peak_gib'] / dense_peak:.2f}" if dense_peak else "-"
        lines.append(
            f"| {r['kernel']} | {r.get('fwd_ms', float('nan')):.2f} | {r['fwd_bwd_ms']:.2f} | {_ratio(cudnn, ms)} | {_ratio(fastest, ms)} | "
            f"{gate} | {mask} | {r['peak_gib']:.2f} | {peak} | {density} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import torch._inductor.config

    torch._inductor.config.max_autotune = args.max_autotune
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"args: {vars(args)}", flush=True)
    for spec in args.grids:
        grid = parse_grid(spec)
        torch.manual_seed(0)
        q, k, v = make_inputs(args, grid, DTYPES[args.dtype])
        rows = [measure(f"sdpa {name}", dense_fn(DENSE[name]), q, k, v, args) for name in args.dense]
        rows += list(vmoba_rows(args, grid, q, k, v))
        print(table(rows, q.shape[1]), flush=True)
        if args.out:
            with args.out.open("a") as f:
                for row in rows:
                    f.write(
                        json.dumps({"grid": spec, "heads": args.heads, "head_dim": args.head_dim, **row})
                        + "\n"
                    )
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
