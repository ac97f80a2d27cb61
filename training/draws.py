"""The random timesteps and noise of a training step, drawn per sample from its place in the global batch.

Each sample's flow time `t` and noise come from a generator seeded by (run seed, optimizer step,
micro-step, the sample's index in the global batch), so they do not depend on how the global batch is
split over data-parallel ranks (two ranks of batch 1 draw what one rank of batch 2 draws), are the same
on every rank of a sequence-parallel group, and need no state in checkpoints: a resumed run draws exactly
what the uninterrupted run drew at the same step.
"""

import torch

from training.objective import FlowMatching

_MIX = 1_000_003  # a prime that spreads (seed, step, micro, index) over distinct generator seeds


def sample_key(seed: int, step: int, micro: int, index: int) -> int:
    """The generator seed of one sample: distinct for distinct (seed, step, micro, index) in practice."""
    return (((seed * _MIX + step) * _MIX + micro) * _MIX + index) % (1 << 63)


def draw(
    objective: FlowMatching,
    shape: tuple[int, ...],
    *,
    seed: int,
    step: int,
    micro: int,
    first_index: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`t [B]` and `noise [B, C, F, H, W]` (`shape`) for the micro-batch whose first sample has index
    `first_index` in the global batch of optimizer step `step`. Drawn on the CPU (the same numbers on
    every device), then moved to `device`."""
    ts, noises = [], []
    for i in range(shape[0]):
        generator = torch.Generator().manual_seed(sample_key(seed, step, micro, first_index + i))
        ts.append(objective.sample_timesteps(1, generator=generator))
        noises.append(torch.randn(shape[1:], generator=generator))
    return torch.cat(ts).to(device), torch.stack(noises).to(device)
