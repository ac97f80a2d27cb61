"""Resuming with a changed config: refuse what a checkpoint cannot continue, make allowed changes take effect.

A checkpoint stores the config it was trained with (`config.yaml`). `ResumePlan.check` compares it, key by
key, with the new run's resolved config before anything is loaded:

- keys that never change what training computes (`HARMLESS`: wandb, logging, evaluation, sampling,
  checkpointing, `train.steps`, loader workers, memory-only switches, EMA) pass with a log line;
- every other changed key (architecture, attention, batch geometry and world size, optimizer and LR
  schedule, objective, data settings, seed) is refused with a `ResumeError` naming each key as
  `old -> new`, unless listed in `checkpoint.allow_changes` (a key, or a node such as `attention`); allowed
  changes are logged.

`ResumePlan.apply` then makes allowed changes real where the checkpoint would override them: DeepSpeed
restores the LR and optimizer hyper-parameters from the checkpoint, so a new `train.lr` (or schedule, or
`optimizer.betas/eps/weight_decay`) is written back into the optimizer's param groups and the scheduler;
a new batch geometry restarts the data stream at the next epoch (its position counts batches of the old
size). `ResumePlan.write_config` keeps each segment's config: `config.yaml` on the first start,
`config.resume-<step>.yaml` on each resume.
"""

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml
from omegaconf import OmegaConf

from training.config import TrainConfig

log = logging.getLogger(__name__)

# Keys (or whole nodes) whose change never alters what a resumed run computes.
HARMLESS = (
    "wandb", "eval", "sample", "checkpoint", "ema",  # EMA only averages; turning it on mid-run is supported
    "train.steps", "train.log_every",
    "train.activation_checkpointing", "train.keep_attention", "train.keep_attention_blocks",  # memory only
    "attention.backend",  # the same attention, another kernel
    "data.num_workers", "data.decode_workers",
    "deepspeed.overlap_comm", "deepspeed.contiguous_gradients", "deepspeed.reduce_bucket_size",
    "deepspeed.allgather_bucket_size",
)  # fmt: skip
# The number of clips per optimizer step and their split over ranks; `world_size` is not a config key but
# is compared (and allowed) as one.
BATCH_GEOMETRY = ("train.batch_size", "train.grad_accum", "train.sequence_parallel", "world_size")
# Restored by DeepSpeed from the checkpoint (LR schedule state, param groups): re-applied when changed.
SCHEDULE = ("train.lr", "train.warmup_steps", "train.lr_schedule", "train.min_lr_ratio", "train.steps")
OPTIMIZER_GROUP = {
    "optimizer.betas": "betas",
    "optimizer.eps": "eps",
    "optimizer.weight_decay": "weight_decay",
}


class ResumeError(ValueError):
    """The new config changes what the checkpoint cannot continue; the message names every key."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def _under(key: str, nodes) -> bool:
    return any(key == n or key.startswith(n + ".") for n in nodes)


def config_values(config_yaml: str, world_size: int) -> dict[str, Any]:
    """Flat `{dotted key: value}` of a config as train.py writes it, plus `world_size`."""
    return {**_flatten(yaml.safe_load(config_yaml) or {}), "world_size": world_size}


def _suggest(keys) -> list[str]:
    """The `allow_changes` entries covering `keys`: a node for 3 or more of its keys, else each key."""
    nodes = [k.split(".")[0] for k in keys]
    return list(dict.fromkeys(n if nodes.count(n) >= 3 else k for k, n in zip(keys, nodes, strict=True)))


def compare(old: dict[str, Any], new: dict[str, Any], allow: list[str]) -> dict[str, dict]:
    """Classify the keys that differ between `old` and `new` (flat, from `config_values`).

    Returns `{"allowed": ..., "harmless": ..., "unmatched": ...}`, each `{key: (old, new)}` (`unmatched`: keys
    only one side has, e.g. a setting added since the checkpoint; they pass). Raises ResumeError for the
    changed keys neither harmless nor under an `allow` entry, and for `allow` entries naming no key."""
    unknown = [a for a in allow if not any(_under(k, [a]) for k in new)]
    if unknown:
        raise ResumeError(
            f"checkpoint.allow_changes names no config key: {unknown} (e.g. train.lr, attention)"
        )
    harmless = HARMLESS
    if old.get("attention.type") == new.get("attention.type") == "full":  # VMoBA's settings are unused
        harmless = (*HARMLESS, *(k for k in new if k.startswith("attention.") and k != "attention.type"))
    changes: dict[str, dict] = {"allowed": {}, "harmless": {}, "unmatched": {}, "refused": {}}
    for key in sorted(old.keys() | new.keys()):
        if key not in old or key not in new:
            changes["unmatched"][key] = (old.get(key, "<absent>"), new.get(key, "<absent>"))
        elif old[key] != new[key]:
            kind = "harmless" if _under(key, harmless) else "allowed" if _under(key, allow) else "refused"
            changes[kind][key] = (old[key], new[key])
    refused = changes.pop("refused")
    if refused:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in refused.items()))
        raise ResumeError(
            f"the config changes what the checkpoint was trained with:\n{lines}\nA resumed run would not "
            "continue the same training (a different model, attention, batch, optimizer or data). To resume "
            f"anyway, allow them: checkpoint.allow_changes=[{','.join(_suggest(refused))}]; or start a new run "
            "dir (hydra.run.dir=...) from the weights."
        )
    return changes


class ResumePlan:
    """Checks a checkpoint's config against the new run's (`check`, the Checkpointer's hook) and applies
    the allowed changes once it is loaded (`apply`)."""

    def __init__(self, cfg: TrainConfig, world_size: int):
        """`world_size`: every rank of the new run, as a checkpoint records it (`complete.json`); with
        sequence parallelism the data-parallel size follows from it and `train.sequence_parallel`."""
        self.cfg, self.world_size = cfg, world_size
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        self.changes: dict[str, dict] = {"allowed": {}, "harmless": {}, "unmatched": {}}

    def check(self, checkpoint: Path, saved_world_size: int) -> None:
        """Raise ResumeError for refused changes between `checkpoint`'s config and the new one; log the rest."""
        file = Path(checkpoint) / "config.yaml"
        old_yaml = file.read_text() if file.is_file() else ""
        if not old_yaml.strip():
            log.warning(
                f"{file} is missing or empty: the config changes since the checkpoint are not checked"
            )
            self.changes = {"allowed": {}, "harmless": {}, "unmatched": {}}
            return
        new = config_values(self.config_yaml, self.world_size)
        self.changes = compare(
            config_values(old_yaml, saved_world_size), new, list(self.cfg.checkpoint.allow_changes)
        )
        titles = {
            "allowed": "allowed by checkpoint.allow_changes",
            "harmless": "not affecting training",
            "unmatched": "in only one of the configs (a setting added or removed since)",
        }
        for kind, title in titles.items():
            if self.changes[kind] and not (dist.is_initialized() and dist.get_rank() > 0):  # logged once
                listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in self.changes[kind].items())
                log.info(f"resume from {checkpoint}: config changes {title}: {listed}")

    def apply(self, engine, state) -> None:
        """Make the allowed changes take effect after `Checkpointer.load` restored the old values: the LR
        schedule and optimizer hyper-parameters in `engine`, the data position in `state` (TrainerState)."""
        changed = {**self.changes["allowed"], **self.changes["harmless"]}
        if any(k in changed for k in SCHEDULE):
            set_learning_rate(engine, self.cfg.train.lr)
        groups = engine.lr_scheduler.optimizer.param_groups if engine.lr_scheduler else []
        for key, name in OPTIMIZER_GROUP.items():
            if key in changed:
                value = self.cfg.optimizer.betas if name == "betas" else getattr(self.cfg.optimizer, name)
                for group in groups:
                    group[name] = tuple(value) if name == "betas" else value
        if any(k in changed for k in BATCH_GEOMETRY) and state.data["batch"] > 0:
            epoch = state.data["epoch"] + 1
            log.info(f"the batch geometry changed: the data stream continues at the start of epoch {epoch}")
            state.data = {"epoch": epoch, "batch": 0}

    def write_config(self, run_dir: str | Path, resumed_step: int | None) -> Path:
        """Write this segment's config: `config.yaml` on a first start (or when the run dir has none),
        `config.resume-<step>.yaml` when resuming, so that every segment's settings are kept."""
        run_dir = Path(run_dir)
        first = resumed_step is None or not (run_dir / "config.yaml").exists()
        path = run_dir / ("config.yaml" if first else f"config.resume-{resumed_step:06d}.yaml")
        path.write_text(self.config_yaml)
        return path


def set_learning_rate(engine, lr: float) -> None:
    """Make `lr` the base LR of `engine`'s LambdaLR schedule from its current step on: DeepSpeed's load
    restored the checkpoint's base LRs in the scheduler and the current LR in the optimizer's param groups
    (which the next optimizer step uses); both are rewritten, the latter as `lr * factor(step)`."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
