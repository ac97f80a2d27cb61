"""Time each pass of the `keyed` token-granularity kernels for several tile shapes (a tuning tool).

For one grid and top-k density: dense cuDNN forward+backward as the baseline, the gate, then forward
pass 1 (row max), pass 2 (exp @ v with atomics) and the backward alone for each (gathered queries, keys per
program, warps, pipeline stages) in `--tiles`, and forward+backward of the best combination against cuDNN,
in one process. The defaults live in `vmoba.KernelOptions.keyed_tiles` (docs/notes/16-keyed-triton-kernels.md,
docs/notes/17-keyed-row-lists.md).

    python scripts/kernels/bench_keyed_tiles.py --grid 24x36x64 --density 0.25
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# The repository (vmoba) and scripts/ (bench_attention); this folder is on sys.path already.
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

from bench_attention import parse_grid  # noqa: E402
from bench_attention import timed as timed_ms  # noqa: E402

from vmoba import KernelOptions, VMoBAConfig, dense_attention, keyed  # noqa: E402
from vmoba.partition import block_layout, partition_layout, valid_mask  # noqa: E402
from vmoba.selection import select  # noqa: E402


def timed(fn) -> float:
    return timed_ms(fn, warmup=2, iters=5)


def token_arguments(p: argparse.ArgumentParser) -> None:
    """The token-granularity benchmarks' problem: --grid (a tuple), --density, --heads."""
    p.add_argument("--grid", type=parse_grid, default="24x36x64", help="latent grid TxHxW")
    p.add_argument("--density", type=float, default=0.25, help="per-token top-k density")
    p.add_argument("--heads", type=int, default=12)


def token_selection(grid, density: float, q, k, v):
    """The benchmarks' token-granularity setup: 3D blocks of 4x4x8 padded to keyed's tiles, each query's
    top-k blocks at `density`. q, k, v [1, L, H, D] raster order -> (cfg, layout, valid bool [L'],
    (qb, kb, vb) contiguous block order [1, L', H, D], sel bool [1, H, L', C])."""
    layout = block_layout(grid, "3d", (4, 4, 8), keyed.BLOCK_N)
    cfg = VMoBAConfig(
        partitions=["3d"],
        granularity="token",
        selection="topk",
        topk_3d=max(1, round(density * layout.num_blocks)),
    )
    valid = valid_mask(layout, q.device)
    qb, kb, vb = (partition_layout(t, layout).contiguous() for t in (q, k, v))
    with torch.no_grad():
        sel = select(qb, kb, layout, valid, cfg, "3d")
    return cfg, layout, valid, (qb, kb, vb), sel


TILES = ["128,128,4,3", "64,128,4,1", "64,128,8,3", "64,128,8,2", "64,128,4,3", "128,128,8,2", "32,128,8,3"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    token_arguments(p)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tiles", nargs="+", default=TILES, help="BLOCK_M,BLOCK_N,num_warps,stages per variant")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_keyed_tiles.py needs a CUDA GPU")
    grid = args.grid
    L, H, D = grid[0] * grid[1] * grid[2], args.heads, args.head_dim
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))

    def dense():
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        dense_attention(*x).backward(grad)

    cudnn = timed(dense)
    cfg, layout, valid, (qb, kb, vb), sel = token_selection(grid, args.density, q, k, v)
    with torch.no_grad():
        gate = timed(lambda: select(qb, kb, layout, valid, cfg, "3d"))
    lists, valid8 = keyed.row_lists(sel, valid, layout.padded_volume), valid.view(torch.uint8)
    stat = torch.full((1, H, qb.shape[1]), -torch.inf, device="cuda")
    stat2, acc = torch.zeros_like(stat), torch.zeros(qb.shape, device="cuda")
    lse, delta = torch.rand_like(stat) + 5, torch.randn_like(stat)
    dk, dv = torch.empty_like(kb), torch.empty_like(vb)
    passes = {  # each pass on the tiles given
        0: lambda tiles: keyed._launch(0, qb, kb, vb, acc, stat, stat2, *lists, valid8, tiles=tiles),
        1: lambda tiles: keyed._launch(1, qb, kb, vb, acc, stat, stat2, *lists, valid8, tiles=tiles),
        2: lambda tiles: keyed._launch(
            2, qb, kb, vb, acc, lse, delta, *lists, valid8, do=grad, dk=dk, dv=dv, tiles=tiles
        ),
    }
    print(
        f"L = {L}, density {sel.float().mean().item():.3f}: cuDNN fwd+bwd {cudnn:.2f} ms, gate {gate:.2f} ms"
    )
    print(
        "| tile (queries, keys, warps, stages) | fwd pass 1 ms | fwd pass 2 ms | bwd ms |\n| --- | --- | --- | --- |"
    )
    defaults, best = KernelOptions().keyed_tiles, {}
    for spec in args.tiles:
        tile = tuple(int(x) for x in spec.split(","))
        row = []
        for n, run in passes.items():
            tiles = tuple(tile if i == n else defaults[i] for i in range(3))
            try:
                ms = timed(lambda run=run, tiles=tiles: run(tiles))
                best[n] = min(best.get(n, (ms, tile)), (ms, tile))
                row.append(f"{ms:.2f}")
            except Exception as err:  # e.g. out of shared memory for this tile
                row.append(f"failed ({type(err).__name__})")
        print(f"| {spec} | " + " | ".join(row) + " |", flush=True)
    options = KernelOptions(keyed_tiles=tuple(best.get(n, (0, defaults[n]))[1] for n in range(3)))

    def fwd_bwd():
        x = [t.detach().requires_grad_() for t in (qb, kb, vb)]
        keyed.keyed_attention(*x, sel, layout.padded_volume, valid, options=options).backward(grad)

    ms = timed(fwd_bwd)
    print(
        f"best {options.keyed_tiles}: fwd+bwd {ms:.2f} ms = {cudnn / ms:.2f}x cuDNN, "
        f"with the gate {cudnn / (ms + gate):.2f}x"
    )


if __name__ == "__main__":
    main()
