"""Attention backends as one registry: a `Backend` record per kernel, looked up by `vmoba_attention`.

A record says everything `vmoba_attention` needs to run a kernel: which order it differentiates through,
how its blocks must be padded, what it cannot run, and its entry function, called one way for all of
them (`Backend`). Adding a backend is one record and one `register` call (docs/vmoba.md, "How to add an
attention backend"); `auto` (`resolve`) picks among the built-in ones.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from . import fa4, keyed
from .flash import flash_varlen_attention
from .options import KernelOptions
from .partition import BlockOrder
from .reference import reference_attention
from .tiles import TILE

# attend(q, k, v, sel, valid, order, *, blocks, options) -> out: see `Backend`.
Attend = Callable[..., torch.Tensor]


def runs_anything(q: torch.Tensor) -> str | None:
    """The default `Backend.unsupported`: no check in advance (the kernel raises what it cannot run)."""
    return None


@dataclass(frozen=True)
class Backend:
    """One attention backend: the record `vmoba_attention(..., backend=name)` runs.

    Fields:
        name: the `backend` argument (and the `attention.backend` config value) that selects it.
        attend: the entry function, `attend(q, k, v, sel, valid, order, *, blocks, options) -> out`:
            q, k, v: [B, S + L, H, D] raster order as given to `vmoba_attention` (S prefix tokens);
            sel: bool [B, H, R, P + C], the selection with the P prefix blocks in front (R = head + C*V
                slots at token granularity, P + C blocks at block granularity);
            valid: bool [head + C*V], the block-order slots that hold tokens;
            order: the call's `vmoba.partition.BlockOrder` (`order.layout.padded_volume`: V, slots per
                block, a multiple of `pad_to`; `order.padded`: whether any slot is padding);
            blocks: (qb, kb, vb) = `order.to_blocks` of q, k, v, [B, head + C*V, H, D];
            options: the call's `KernelOptions`;
            out: [B, S + L, H, D] in q's dtype, raster order (`order.from_blocks` of a block-order result).
        consumes: "blocks": `attend` differentiates through `blocks`, which are made under autograd (a
            kernel on block-order tensors; `on_blocks` makes its `attend`); "raster": it differentiates
            through q, k, v itself (its own autograd Function, taking `order`), and `blocks` are made
            outside autograd (on CUDA one row gather each) for its forward to reuse.
        pad_to: each block's slots are rounded up to a multiple of this (the kernel's tile); 1: none.
        unsupported: q [B, S + L, H, D] -> why the backend cannot run on it, or None. Asked before the gate
            when the backend is named (the reason raised: ImportError when it is `install_hint`, else
            ValueError), and by `auto` for keyed and fa4.
        install_hint: the reason `unsupported` gives when only a package is missing.
    """

    name: str
    attend: Attend
    consumes: Literal["blocks", "raster"] = "blocks"
    pad_to: int = 1
    unsupported: Callable[[torch.Tensor], str | None] = runs_anything
    install_hint: str | None = None

    def __post_init__(self):
        if not self.name or self.name == "auto":
            raise ValueError(f"a backend needs a name other than 'auto', got {self.name!r}")
        if self.consumes not in ("blocks", "raster"):
            raise ValueError(f"Backend.consumes must be 'blocks' or 'raster', got {self.consumes!r}")
        if self.pad_to < 1:
            raise ValueError(f"Backend.pad_to must be >= 1, got {self.pad_to}")


# name -> record, in registration order (the order `BACKENDS` lists them).
REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add `backend` to the registry (a name may be registered once); returns it."""
    if backend.name in REGISTRY:
        raise ValueError(f"an attention backend named {backend.name!r} is registered already")
    REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> Backend:
    """Remove the backend registered as `name`; returns its record."""
    if name not in REGISTRY:
        raise ValueError(f"no attention backend named {name!r} is registered; registered: {list(REGISTRY)}")
    return REGISTRY.pop(name)


class _Names(Sequence):
    """("auto", *registered names), read from the registry at each use, so a backend registered after
    `from vmoba import BACKENDS` is in it too."""

    def _names(self) -> tuple[str, ...]:
        return ("auto", *REGISTRY)

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return 1 + len(REGISTRY)

    def __repr__(self) -> str:
        return repr(self._names())


BACKENDS: Sequence[str] = _Names()


def check_name(name: str) -> None:
    """Raise ValueError unless `name` is "auto" or a registered backend."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def resolve(name: str, q: torch.Tensor, granularity: str) -> Backend:
    """The backend that runs this call (`name` in `BACKENDS`). `auto` on CUDA: keyed for token granularity,
    fa4 for block granularity (the fastest at each: docs/notes/10-fa4-block-sparse-kernels.md,
    docs/notes/16-keyed-triton-kernels.md), flex where those cannot run; reference on CPU. A named backend
    that cannot run q raises its reason."""
    check_name(name)
    if name != "auto":
        backend = REGISTRY[name]
        reason = backend.unsupported(q)
        if reason:
            raise (ImportError if reason == backend.install_hint else ValueError)(reason)
        return backend
    # On CPU FlexAttention has no backward and compiles ~18 s per shape, which outweighs its forward gain at
    # the sizes a CPU handles (docs/benchmarks.md, "CPU: what auto picks").
    if not q.is_cuda:
        return REGISTRY["reference"]
    if granularity == "token" and not REGISTRY["keyed"].unsupported(q):
        return REGISTRY["keyed"]
    fast = REGISTRY["fa4"]
    reason = fast.unsupported(q)
    if reason and reason == fast.install_hint:  # the GPU could run fa4: say what the fallback costs, once
        _warn_once(
            "vmoba: backend='auto' runs block granularity with flex because FlashAttention-4 is not "
            "installed; its kernels are 1.3-1.5x faster than flex's (docs/benchmarks.md). " + reason
        )
    return REGISTRY["flex"] if reason else fast


def on_blocks(kernel: Callable[..., torch.Tensor]) -> Attend:
    """The `attend` of a kernel on block-order tensors, `kernel(qb, kb, vb, sel, block_slots, valid) ->
    [B, head + C*V, H, D]` (e.g. `reference_attention`), for a backend that consumes "blocks"."""

    def attend(q, k, v, sel, valid, order: BlockOrder, *, blocks, options: KernelOptions) -> torch.Tensor:
        return order.from_blocks(kernel(*blocks, sel, order.layout.padded_volume, valid))

    return attend


def _flex(q, k, v, sel, valid, order: BlockOrder, *, blocks, options: KernelOptions) -> torch.Tensor:
    from . import flex  # on first use: it pulls in torch._dynamo (~1.5 s at import)

    kernel_options = options.flex_kernel_options
    out = flex.flex_block_attention(
        *blocks,
        sel,
        order.layout.padded_volume,
        valid,
        kernel_options=None if kernel_options is None else dict(kernel_options),
    )
    return order.from_blocks(out)


def _fa4(q, k, v, sel, valid, order: BlockOrder, *, blocks, options: KernelOptions) -> torch.Tensor:
    V, groups = order.layout.padded_volume, options.fa4_backward_head_groups
    return fa4.fa4_block_attention(q, k, v, sel, V, valid, order.padded, order, blocks, groups)


def _keyed(q, k, v, sel, valid, order: BlockOrder, *, blocks, options: KernelOptions) -> torch.Tensor:
    return keyed.keyed_attention(q, k, v, sel, order.layout.padded_volume, valid, order, blocks, options)


register(Backend("reference", on_blocks(reference_attention)))
register(Backend("flex", _flex, pad_to=TILE))
register(
    Backend(
        "fa4",
        _fa4,
        consumes="raster",
        pad_to=TILE,
        unsupported=fa4.unsupported,
        install_hint=fa4.INSTALL_HINT,
    )
)
register(Backend("keyed", _keyed, consumes="raster", pad_to=keyed.BLOCK_N, unsupported=keyed.unsupported))
register(Backend("flash_varlen", on_blocks(flash_varlen_attention)))
