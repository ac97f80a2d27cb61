"""How fast can a GPU add 512-byte fp32 rows at scattered query rows? The floor of the `keyed` kernels.

Each (query, selected key block) pair of the token-granularity kernels adds a row of D = 128 fp32 to the
output accumulator (forward) and to dq (backward): 9.2 G floats per pass at 55K tokens, 12 heads, 25%.
This times that traffic alone, with the real pair count and the lists' layout (rows ascending per key
block, acc [L, H, D]), four ways in one process:

- red.v4: `red.global.add.v4.f32` from registers, what Triton's `tl.atomic_add` compiles to;
- bulk reduce: the tile staged in shared memory, one `cp.reduce.async.bulk` (TMA) per row, as
  FlashAttention-3 reduces dq;
- scatter store: plain 16-byte stores to the same rows (no reduction, so racy: timing only);
- contiguous store: the same bytes written back to back (the baseline every ratio is against).

`--window N` folds the rows into the first N tokens, so the accumulator fits in L2 (e.g. 2048: 12 MiB).

Then whether the reductions can hide under tensor-core work, as a warp-specialised kernel would have
them: per program, four warps do a tile's products (2 x 64 x 128 x 128 MACs as `mma.sync`, on register
data) while four others add the tile's rows (`red.v4`), with no dependence between them; products alone,
reductions alone, and both, with two programs per SM as the real kernels have.
Needs a CUDA GPU of sm90 (Hopper) and nvcc, which compiles `bench_scatter.cu` next to this file.

    python scripts/kernels/bench_scatter.py --tokens 55296 --density 0.25
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# The repository (vmoba) and scripts/ (bench_attention); this folder is on sys.path already.
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

from bench_attention import timed  # noqa: E402

MODES = {"red.v4": 0, "bulk reduce": 2, "scatter store": 1, "contiguous store": 3}
D = 128


def build(source: Path) -> ctypes.CDLL:
    """Compile the CUDA file `source` (next to this script) for sm90a with nvcc and load it."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        sys.exit(f"{source.stem}.py needs nvcc (the CUDA toolkit) on PATH to compile {source.name}")
    lib = Path(tempfile.mkdtemp()) / f"lib{source.stem}.so"
    cmd = [
        nvcc,
        "-O3",
        "-gencode",
        "arch=compute_90a,code=sm_90a",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        "-o",
        str(lib),
        str(source),
    ]
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(lib))


def random_row_lists(tokens: int, heads: int, blocks: int, density: float):
    """Random CSR lists: per (head, key block), the ascending query rows that picked it (~density of all)."""
    sel = torch.rand(heads, blocks, tokens, device="cuda") < density
    counts = sel.sum(-1).view(-1)
    starts = torch.zeros(heads * blocks + 1, dtype=torch.int64, device="cuda")
    torch.cumsum(counts, 0, out=starts[1:])
    rows = sel.view(heads * blocks, tokens).nonzero()[:, 1].to(torch.int32).contiguous()
    return starts, rows, counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=55296)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--blocks", type=int, default=432, help="key blocks (128 tokens each at 55K)")
    p.add_argument("--density", type=float, default=0.25)
    p.add_argument("--window", type=int, nargs="+", default=[0], help="fold rows into N tokens (0: none)")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("bench_scatter.py needs an sm90+ CUDA GPU")
    lib = build(Path(__file__).with_suffix(".cu"))
    torch.manual_seed(0)
    L, H, C = args.tokens, args.heads, args.blocks
    starts, rows, counts = random_row_lists(L, H, C, args.density)
    pairs = rows.numel()
    acc = torch.zeros(L, H, D, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def run(mode: int, window: int) -> None:
        ptrs = (ctypes.c_void_p(t.data_ptr()) for t in (acc, starts, rows))
        if lib.scatter(mode, *ptrs, H, C, L, window, ctypes.c_void_p(stream)):
            raise RuntimeError(f"scatter mode {mode} failed to launch")

    # Both reductions must add exactly (every value is 1.0): acc[l, h, :] = the blocks row l picked in head h.
    heads_of_pairs = torch.arange(H, device="cuda").repeat_interleave(C).repeat_interleave(counts)
    expect = torch.zeros(L, H, device="cuda").index_put_(
        (rows.long(), heads_of_pairs), torch.ones(pairs, device="cuda"), accumulate=True
    )
    for name in ("red.v4", "bulk reduce"):
        acc.zero_()
        run(MODES[name], L)
        if not torch.equal(acc, expect[:, :, None].expand_as(acc)):
            sys.exit(f"{name} added the wrong values")
    gbytes = pairs * D * 4 / 1e9
    print(f"# {torch.cuda.get_device_name()}: {pairs:,} pairs, {gbytes:.1f} GB of fp32 rows per pass")
    for window in args.window:
        window = window or L
        times = {
            name: timed(lambda mode=mode, window=window: run(mode, window), 1, args.iters)
            for name, mode in MODES.items()
        }
        base = times["contiguous store"]
        for name, ms in times.items():
            footprint = window * H * D * 4 / 2**20
            print(
                f"rows in {window:>6} tokens ({footprint:5.0f} MiB)  {name:<17} {ms:6.2f} ms  "
                f"{gbytes / ms:5.2f} TB/s  {ms / base:4.2f}x the contiguous store",
                flush=True,
            )

    sink = torch.empty(C * H * 128, device="cuda")

    def overlapped(work: int) -> None:
        ptrs = (ctypes.c_void_p(t.data_ptr()) for t in (acc, starts, rows))
        if lib.overlapped(work, *ptrs, H, C, L, ctypes.c_void_p(sink.data_ptr()), ctypes.c_void_p(stream)):
            raise RuntimeError(f"overlap work {work} failed to launch")

    for work in (2, 3, 6, 7):
        acc.zero_()
        overlapped(work)
        if not torch.equal(acc, expect[:, :, None].expand_as(acc)):
            sys.exit(f"overlap work {work} added the wrong values")
    products = timed(lambda: overlapped(1), 1, args.iters)
    print(f"overlap: products alone (4 warps, mma.sync) {products:.2f} ms", flush=True)
    for name, alone, both in (("red.v4 from 4 warps", 2, 3), ("bulk reduce from 1 warp", 6, 7)):
        alone, both = (
            timed(lambda w=alone: overlapped(w), 1, args.iters),
            timed(lambda w=both: overlapped(w), 1, args.iters),
        )
        print(
            f"overlap: reductions by {name}: alone {alone:.2f} ms, beside the products {both:.2f} ms "
            f"= {both / max(products, alone):.2f}x their max, {both / (products + alone):.2f}x their sum",
            flush=True,
        )


if __name__ == "__main__":
    main()
