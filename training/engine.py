"""DeepSpeed setup: process group, the DeepSpeed JSON config generated from Hydra values, the engine.

Works under `deepspeed train.py`, `torchrun train.py` and plain `python train.py` (a single process with a
local rendezvous); the backend is NCCL on GPU and gloo on CPU.
"""

import math
import os

import torch

from training.config import TrainConfig


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or, for a plain `python train.py`, create) the process group; returns (rank, world, device)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        # A plain `python train.py` has no launcher env: make a one-process group on a free local port.
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def free_port() -> int:
    """A TCP port free on this host now (a rendezvous port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_bf16(precision: str) -> bool:
    """`auto` is bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slow and the demo wants exactness)."""
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config dict, generated from the validated Hydra values (never a hand-synced JSON).

    `world_size` is the data-parallel size: the processes that read different clips (all of them unless
    sequence parallelism groups several on one clip)."""
    ds = cfg.deepspeed
    zero: dict = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.allgather_bucket_size,
    }
    if ds.stage == 3:
        # Lets the engine gather a full 16-bit state dict for the diffusers export.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.train.grad_clip,
        "bf16": {"enabled": use_bf16(cfg.train.precision)},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our logger reports; keep DeepSpeed's own prints quiet
        "wall_clock_breakdown": False,
    }
    if ds.comms_logger:
        config["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    if ds.offload_optimizer != "none" and cfg.optimizer.name == "adamw":
        # torch AdamW on offloaded states is allowed but DeepSpeed wants to be told so explicitly.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def lr_lambda(cfg: TrainConfig):
    """Multiplier of `train.lr` at optimizer step `s`: linear warmup, then constant / linear / cosine decay
    to `min_lr_ratio`."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        if t.lr_schedule == "constant":
            return 1.0
        decay = 1 - progress if t.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return factor


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The client optimizer: torch AdamW, or DeepSpeed's Adam (CPU Adam for offloaded or CPU states,
    FusedAdam on GPU; both JIT-build a small op on first use)."""
    opt = cfg.optimizer
    kwargs = dict(lr=cfg.train.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if cfg.deepspeed.offload_optimizer != "none" or not torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(params, adam_w_mode=True, **kwargs)


def build_engine(model: torch.nn.Module, cfg: TrainConfig, world_size: int, mpu=None):
    """Wrap `model` in a DeepSpeed engine with its optimizer and LR schedule (stepped by `engine.step()`
    at each accumulation boundary, and saved with the engine's checkpoint). `world_size` is the
    data-parallel size; `mpu` the sequence-parallel groups (`training.parallel.UlyssesMPU`) or None."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size),
        mpu=mpu,
    )
    return engine
