"""Exponential moving average of a module's trainable parameters, kept in float32."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class EMA:
    """`shadow = decay * shadow + (1 - decay) * param` after every optimizer step.

    The shadow copies live on the parameters' device in float32 (bf16 weights would round away the small
    per-step updates). `applied(module)` swaps them into the module, e.g. to export or sample.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, param in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1 - self.decay)

    @contextmanager
    @torch.no_grad()
    def applied(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the averaged weights into `module` (restored on exit)."""
        backup = {}
        for name, param in module.named_parameters():
            if name in self.shadow:
                backup[name] = param.detach().clone()
                param.copy_(self.shadow[name])
        try:
            yield module
        finally:
            for name, param in module.named_parameters():
                if name in backup:
                    param.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.cpu() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for name, t in self.shadow.items():
            t.copy_(state[name])
