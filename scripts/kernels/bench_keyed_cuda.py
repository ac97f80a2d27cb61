"""The `keyed` kernels on Hopper: the warp-specialised CUDA kernels against the Triton ones, pass by pass.

Times `keyed.accumulate` and `keyed.backward_pass` on the CUDA kernels (vmoba/_keyed.cu: wgmma consumer
warpgroups, cp.async gather warps, TMA bulk reduce-add warps; docs/notes/25-keyed-wgmma-kernels.md to
31-producer-addresses.md) against the same calls on Triton's pass 1 and backward, on the same inputs,
selection, row lists and norm-bound offsets, in one process.
Checks first that both compute the same values (relative difference <= 1e-4 for the fp32 outputs, 2e-2
for the bf16 dk, dv), or exits non-zero.

Needs an sm90 GPU (H100/H200) and Triton.

    python scripts/kernels/bench_keyed_cuda.py --grid 24x36x64 --density 0.25
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

# The repository (vmoba) and scripts/ (bench_attention); this folder is on sys.path already.
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

from bench_attention import make_inputs, timed  # noqa: E402
from bench_keyed_tiles import token_arguments, token_selection  # noqa: E402

from vmoba import _keyed_cuda, keyed  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    token_arguments(p)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("bench_keyed_cuda.py needs an sm90 CUDA GPU (H100/H200)")
    torch.manual_seed(0)
    shape = SimpleNamespace(batch=1, heads=args.heads, head_dim=128, inputs="smooth")
    q, k, v = (t.detach() for t in make_inputs(shape, args.grid, torch.bfloat16))
    _, layout, valid, (qb, kb, vb), sel = token_selection(args.grid, args.density, q, k, v)
    starts, rows = keyed.row_lists(sel, valid, layout.padded_volume)
    valid8 = valid.view(torch.uint8)
    offsets, bounded = keyed.row_offsets(qb, kb)
    if not bool(bounded):
        sys.exit("these inputs' norm bound is above keyed.BOUND_LIMIT; this benchmark times the bound's path")

    def forward(cuda: bool):
        acc, row_sum = torch.zeros(qb.shape, device="cuda"), torch.zeros_like(offsets)
        keyed.accumulate(qb, kb, vb, acc, offsets, row_sum, starts, rows, valid8, cuda)
        return acc, row_sum

    if not _keyed_cuda.usable(qb):
        sys.exit("the CUDA kernels cannot run here (see the warning above)")
    print(f"# {torch.cuda.get_device_name()}, {qb.shape[1]:,} tokens, {rows.numel():,} pairs")
    acc, row_sum = compare("forward", forward, {"accumulator": 1e-4, "row sums": 1e-4}, args.iters)

    # The backward, from the forward's lse and a random output gradient.
    out_b, lse = torch.empty_like(qb), torch.empty_like(offsets)
    keyed._rowwise(keyed._kernels().finish, acc, offsets, row_sum, out_b, lse)
    do = torch.randn_like(qb)
    delta = torch.empty_like(lse)
    keyed._rowwise(keyed._kernels().row_dot, do, out_b, delta)

    def backward(cuda: bool):
        dq, dk, dv = torch.zeros(qb.shape, device="cuda"), torch.empty_like(kb), torch.empty_like(vb)
        keyed.backward_pass(qb, kb, vb, do, dq, dk, dv, lse, delta, starts, rows, valid8, cuda)
        return dq, dk, dv

    # dk, dv are bf16: 2^-8 relative rounding of sums taken in another order
    compare("backward", backward, {"dq": 1e-4, "dk": 2e-2, "dv": 2e-2}, args.iters)


def compare(what: str, run, tolerances: dict[str, float], iters: int):
    """run(cuda) -> outputs, once each way: exits unless every output's max relative difference to the
    Triton one is within its tolerance (`tolerances`, in output order); prints both times. Returns Triton's
    outputs."""
    ref, got = run(False), run(True)
    diffs = {
        name: ((new.float() - old.float()).abs().max() / old.float().abs().max()).item()
        for name, new, old in zip(tolerances, got, ref)
    }
    print(f"{what}, relative difference to Triton: " + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()))
    if any(diffs[name] > tol for name, tol in tolerances.items()):
        sys.exit(f"the CUDA {what} does not compute what the Triton {what} computes")
    t_triton, t_cuda = (timed(lambda cuda=cuda: run(cuda), 1, iters) for cuda in (False, True))
    print(
        f"{what}: Triton {t_triton:.2f} ms, warp-specialised CUDA {t_cuda:.2f} ms: {t_triton / t_cuda:.2f}x "
        "(both include zeroing their fp32 outputs)"
    )
    return ref


if __name__ == "__main__":
    main()
