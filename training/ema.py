"""Exponential moving average of a module's trainable parameters, kept in float32, with diffusers'
decay warm-up, under ZeRO-2 (full local parameters) and ZeRO-3 (partitioned parameters, gathered)."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

# ema.pt of checkpoints written before the warm-up existed has no update count; they averaged with the
# constant `decay`, which a resumed run keeps using (any count past the warm-up gives exactly `decay`).
_UPDATES_KEY = "__ema_updates__"
_NO_WARMUP = 10**12
_GATHER_ELEMENTS = 1 << 28  # ZeRO-3: parameters gathered per all-gather (bounds the transient memory)


def decay_at(decay: float, updates: int) -> float:
    """The decay of the update after `updates` earlier ones, as diffusers' `EMAModel` (`update_after_step=0`,
    no `use_ema_warmup`): 0 for the first (the average starts at the first trained weights, not the
    initial ones), then min(decay, (1 + t) / (10 + t)), so a short run's average is mostly trained
    weights (with decay 0.999 a constant decay would keep 90% of the initial weights after 100 steps)."""
    return 0.0 if updates <= 0 else min(decay, (1 + updates) / (10 + updates))


def _partitioned(module: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitions `module`'s parameters (each holds a shard; `ds_id` marks them)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _gathered(params: list[torch.nn.Parameter], modifier_rank: int | None):
    """ZeRO-3: the full `params` inside the context, in chunks of at most `_GATHER_ELEMENTS` elements
    (a collective: every rank enters it). With `modifier_rank`, that rank's writes are kept on exit."""
    import deepspeed

    chunk, size = [], 0
    for p in params:
        chunk.append(p)
        size += p.ds_numel
        if size >= _GATHER_ELEMENTS:
            yield deepspeed.zero.GatheredParameters(chunk, modifier_rank=modifier_rank), chunk
            chunk, size = [], 0
    if chunk:
        yield deepspeed.zero.GatheredParameters(chunk, modifier_rank=modifier_rank), chunk


class EMA:
    """`shadow = d_t * shadow + (1 - d_t) * param` after every optimizer step, `d_t = decay_at(decay, t)`.

    Without ZeRO-3 the shadow copies live on the parameters' device in float32 (bf16 weights would round
    away the small per-step updates) on every rank, as every rank holds the full parameters.

    Under ZeRO-3 each rank holds a shard of every parameter: `update` gathers them (a collective, in chunks)
    and only rank 0 keeps the shadow, on CPU. Rank 0 is the one that saves `ema.pt` and, through
    `applied` (gathered with `modifier_rank=0`), hands the averaged weights to every rank, so copies on the
    other ranks would be unused; CPU because a full float32 copy on the accelerator would undo what ZeRO-3
    partitions. (A sharded average over `ds_tensor` would avoid the gather but makes `ema.pt` and the export
    depend on the partitioning.) `applied(module)` swaps the averages into the module, e.g. to sample or
    export; under ZeRO-3 it and `update` must be called on every rank.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.zero3 = _partitioned(module)
        self.keeper = not self.zero3 or not dist.is_initialized() or dist.get_rank() == 0
        self.shadow: dict[str, torch.Tensor] = {}
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for names, params in self._full(named, modifier_rank=None):
            if self.keeper:
                for n, p in zip(names, params, strict=True):
                    t = p.detach().float().clone()
                    self.shadow[n] = t.cpu() if self.zero3 else t
        self.names = [n for n, _ in named]

    def _full(self, named: list[tuple[str, torch.nn.Parameter]], modifier_rank: int | None):
        """Yields (names, full parameters): all at once without ZeRO-3, gathered chunks under it."""
        if not self.zero3:
            yield [n for n, _ in named], [p for _, p in named]
            return
        by_param = {p: n for n, p in named}
        for context, chunk in _gathered([p for _, p in named], modifier_rank):
            with context:
                yield [by_param[p] for p in chunk], chunk

    def _trained(self, module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        wanted = set(self.names)
        return [(n, p) for n, p in module.named_parameters() if n in wanted]

    @property
    def current_decay(self) -> float:
        """The decay the next `update` applies."""
        return decay_at(self.decay, self.updates)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        weight = 1 - self.current_decay
        for names, params in self._full(self._trained(module), modifier_rank=None):
            if self.keeper:
                for n, p in zip(names, params, strict=True):
                    self.shadow[n].lerp_(p.detach().to(self.shadow[n].device, torch.float32), weight)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the averaged weights into `module` (restored on exit)."""
        named = self._trained(module)
        backup = {}
        for names, params in self._full(named, modifier_rank=0):
            if self.keeper:
                for n, p in zip(names, params, strict=True):
                    backup[n] = p.detach().to("cpu" if self.zero3 else p.device, copy=True)
                    p.copy_(self.shadow[n])
        try:
            yield module
        finally:
            for names, params in self._full(named, modifier_rank=0):
                if self.keeper:
                    for n, p in zip(names, params, strict=True):
                        p.copy_(backup[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights (on CPU) by parameter name, plus the update count under `__ema_updates__`
        (rank 0's under ZeRO-3, which is the one saved)."""
        return {**{n: t.cpu() for n, t in self.shadow.items()}, _UPDATES_KEY: torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load `state_dict()`'s; an ema.pt from before the warm-up (no update count) continues with the
        constant decay it was written with."""
        state = dict(state)
        updates = state.pop(_UPDATES_KEY, None)
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for name, t in self.shadow.items():
            t.copy_(state[name])
        self.updates = _NO_WARMUP if updates is None else int(updates)
