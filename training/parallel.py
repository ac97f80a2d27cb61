"""The parallel layout of a run: data parallel (DP) x Ulysses sequence parallel (SP) over the world.

`world = DP x SP`. The ranks of one SP group are consecutive (`[g*SP, ..., g*SP + SP - 1]`), so on one node
the all-to-alls of sequence parallelism stay on NVLink; DP groups are the ranks with the same position in
their SP group. Every rank of an SP group reads the same clips and draws the same timesteps and noise
(seeded by its DP rank); each holds 1/SP of every clip's tokens (`models.sequence_parallel`).

ZeRO shards parameters, gradients and optimizer states over all DP x SP ranks, as DeepSpeed-Ulysses does:
every rank holds a replica of the same weights. DeepSpeed reads the groups from `UlyssesMPU` (its `mpu`
interface), sums gradients over the SP group (each rank's gradient covers only its tokens) and averages
them over DP, so the update equals one rank's on the whole clip.
"""

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """Where this rank sits. `sp_group` / `dp_group` are process groups (None when that size is 1... or the
    world, for `dp_group`, when SP is 1, so callers reduce over it without a special case)."""

    rank: int
    world: int
    sp: int
    sp_rank: int
    sp_group: Any
    dp: int
    dp_rank: int
    dp_group: Any


def init_layout(sequence_parallel: int) -> Layout:
    """Split the initialised process group into SP groups of `sequence_parallel` ranks and DP groups.

    Every rank must call this (group creation is collective)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = int(sequence_parallel)
    if sp < 1 or world % sp:
        raise ValueError(
            f"train.sequence_parallel={sp} must be >= 1 and divide the number of processes ({world}); "
            f"e.g. {world} (sequence parallel only) or 1 (data parallel only)"
        )
    if sp == 1:
        return Layout(rank, world, 1, 0, None, world, rank, dist.group.WORLD)
    sp_group = dp_group = None
    for g in range(world // sp):  # every rank creates every group, in the same order
        ranks = list(range(g * sp, (g + 1) * sp))
        group = dist.new_group(ranks)
        if rank in ranks:
            sp_group = group
    for i in range(sp):
        ranks = list(range(i, world, sp))
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    return Layout(rank, world, sp, rank % sp, sp_group, world // sp, rank // sp, dp_group)


class UlyssesMPU:
    """The `mpu` object `deepspeed.initialize` takes for Ulysses sequence parallelism (the methods its
    `utils.groups`, engine and ZeRO optimizers call). `initialize_sequence_parallel` marks it as a
    sequence-parallel mpu: ZeRO then treats model parallelism as absent."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def initialize_sequence_parallel(self, *args, **kwargs):  # a marker DeepSpeed checks with hasattr
        raise NotImplementedError("the groups are made by training.parallel.init_layout")

    def get_sequence_parallel_group(self):
        return self.layout.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.layout.sp

    def get_sequence_parallel_rank(self) -> int:
        return self.layout.sp_rank

    def get_sequence_data_parallel_group(self):
        return dist.group.WORLD

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.layout.world

    def get_sequence_data_parallel_rank(self) -> int:
        return self.layout.rank

    def get_data_parallel_group(self):
        return self.layout.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp

    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_rank

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_group(self):
        return None


def comm_seconds() -> float:
    """Seconds spent in collectives so far, by DeepSpeed's comms logger (0 unless
    `deepspeed.comms_logger=true`): its per-op timers accumulate while the logger is on."""
    from deepspeed.comm import comm

    if not comm.comms_logger.enabled:
        return 0.0
    return sum(t.elapsed(reset=False) for t in comm.timers.get_timers().values()) / 1000


def mean_over(group, values: dict) -> dict:
    """`{name: float or scalar tensor}` averaged over the ranks of `group` (one all-reduce); unchanged when
    `group` is None or has one rank. Used for statistics each rank measures on its own share: VMoBA's
    density and recall of its heads (sequence parallel) or of its clips (data parallel)."""
    if group is None or dist.get_world_size(group) == 1 or not values:
        return values
    import torch

    stacked = torch.stack(
        [torch.as_tensor(v, dtype=torch.float32).reshape(()).cpu() for v in values.values()]
    )
    if dist.get_backend(group) == "nccl":
        stacked = stacked.cuda()
    dist.all_reduce(stacked, group=group)  # a sum: gloo has no AVG
    return dict(zip(values, (stacked / dist.get_world_size(group)).tolist(), strict=True))
