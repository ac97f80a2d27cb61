"""The `keyed` kernels on Hopper: `_keyed.cu` (forward pass 1 and the backward), compiled by NVRTC.

Triton cannot schedule what these passes need on an H100/H200 (docs/notes/22-atomics-and-bulk-reduce.md
to 25-keyed-wgmma-kernels.md): the 36.7 GB
of fp32 rows each adds at 55K tokens and 25% density cost >= 9.9 ms however they are issued, so they have to
run under the matrix products, from a warp of their own (TMA bulk reduce-adds), beside warpgroups on
wgmma. The CUDA kernels do that: the forward adds exactly what Triton's pass 1 adds, the backward computes
what Triton's backward does (both to fp32 rounding), with dq added by bulk reduce-adds.

NVRTC ships with PyTorch's CUDA wheels (no toolkit, no nvcc) and `torch.cuda._compile_kernel` wraps it;
the kernel includes no headers. Used on sm_90 for bf16 with D = 128, unless `KernelOptions.keyed_cuda` is
False or the environment says `VMOBA_KEYED_CUDA=0`; any other case, or a failed compile (warned once),
takes the Triton kernels.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_keyed.cu")
SMEM = {"keyed_forward": 200_800, "keyed_backward": 200_752}  # the kernels trap if given less
THREADS = 384
BLOCK = 128  # keys per program, gathered query rows per tile
OPTIONS = ["--use_fast_math", "-std=c++17"]  # NVRTC's; fast math: exp2f as ex2.approx, as Triton's exp2
_INT32_MAX = 2**31 - 1


def usable(qb: torch.Tensor, enabled: bool = True) -> bool:
    """Whether the CUDA kernels take q [B, L, H, D] (block order, contiguous): `enabled`
    (`KernelOptions.keyed_cuda`) and not overridden by VMOBA_KEYED_CUDA=0, sm_90, bf16, D = 128."""
    return (
        enabled
        and os.environ.get("VMOBA_KEYED_CUDA", "1") != "0"
        and qb.is_cuda
        and qb.dtype == torch.bfloat16
        and qb.shape[-1] == 128
        and qb.stride(0) <= _INT32_MAX
        and torch.cuda.get_device_capability(qb.device) == (9, 0)
        and _kernels(qb.device.index) is not None
    )


@functools.cache
def _kernels(device: int):
    """The compiled kernels ({name: kernel}) for one GPU, or None (warned) when NVRTC is missing or fails."""
    try:
        source, kernels = SOURCE.read_text(), {}
        with torch.cuda.device(device):
            # One compile per kernel (~2 s each, once per process): `_compile_kernel` is the one entry point
            # whose call form stays the same across PyTorch releases.
            for name, smem in SMEM.items():
                kernels[name] = torch.cuda._compile_kernel(source, name, "90a", nvcc_options=list(OPTIONS))
                kernels[name].set_shared_memory_config(smem)
        return kernels
    except Exception as e:  # noqa: BLE001  (any failure means: use the Triton kernels)
        warnings.warn(
            f"vmoba: could not compile {SOURCE.name} with NVRTC ({type(e).__name__}: {e}); token "
            "granularity uses its Triton kernels instead (slower on Hopper). Set VMOBA_KEYED_CUDA=0 to skip "
            "the attempt.",
            stacklevel=3,
        )
        return None


def _run(name: str, qb: torch.Tensor, starts: torch.Tensor, *args) -> None:
    """Launch kernel `name` over (128-key tile, b * H + h), with the shape arguments both kernels end with."""
    B, L, H, D = qb.shape
    C = (starts.shape[0] - 1) // (B * H)
    with torch.cuda.device(qb.device):  # the module and the current stream of q's GPU
        _kernels(qb.device.index)[name](
            # Key tiles fastest: the programs running at once are one head's, whose gathered rows and fp32
            # accumulator stay in L2; orders mixing heads ran the forward up to 2.2x slower
            # (docs/notes/33-launch-order.md).
            grid=(L // BLOCK, B * H, 1),
            block=(THREADS, 1, 1),
            args=[*args, L, C, H, L // BLOCK // C, qb.stride(0), qb.stride(1), D**-0.5],
            shared_mem=SMEM[name],
        )


def accumulate(qb, kb, vb, acc, offsets, row_sum, starts, rows, valid) -> None:
    """Pass 1 of `keyed` (vmoba/_keyed_kernels.py, PASS 1): add `exp2(q.k * scale - offset) @ v` to `acc`
    and the row sums to `row_sum`, per key tile over the queries of its block's row list.

    Args:
        qb, kb, vb: [B, L, H, 128] bf16 block order, contiguous (`usable(qb)`); acc: fp32 [B, L, H, 128];
        offsets, row_sum: fp32 [B, H, L] (log2 units); starts, rows: `keyed.row_lists` (C key blocks of a
        multiple of 128 slots); valid: uint8 [L].
    """
    _run("keyed_forward", qb, starts, qb, kb, vb, acc, row_sum, offsets, starts, rows, valid)


def backward(qb, kb, vb, do, dq, dk, dv, lse, delta, starts, rows, valid) -> None:
    """The backward of `keyed` (its Triton PASS 2): add dq to the fp32 `dq`, write `dk`, `dv`.

    Args:
        qb, kb, vb, do: [B, L, H, 128] bf16 block order, contiguous; dq: fp32 [B, L, H, 128]; dk, dv: like kb;
        lse (log2 units), delta (rowsum(dO * O)): fp32 [B, H, L]; starts, rows, valid: as for `accumulate`.
    """
    _run("keyed_backward", qb, starts, qb, kb, vb, do, dq, dk, dv, lse, delta, starts, rows, valid)
