"""Atomic checkpoints: DeepSpeed state + diffusers export + the trainer's resumable state; `latest` pointer.

Layout of `<run_dir>/checkpoints/step_XXXXXX/`:
    deepspeed/               engine state (weights, optimizer, LR schedule) from `engine.save_checkpoint`
    transformer/             the weights in diffusers format (`from_pretrained` loads it)
    transformer_ema/         the EMA weights, when EMA is on
    ema.pt                   EMA state (float32 shadow weights)
    rng_rank_XXX.pt          per-rank RNG states (python, numpy, torch, cuda, named generators)
    trainer_state.json       `TrainerState`: step, data position, elapsed time
    config.yaml              the resolved run config
A checkpoint is written into `.tmp_step_XXXXXX/`, renamed, and only then does `latest` (rewritten with
`os.replace`) point to it: a crash leaves the previous checkpoint as `latest`.
"""

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from training.ema import EMA

DS_TAG = "deepspeed"


@dataclass
class TrainerState:
    """Every piece of resumable state besides the engine, EMA and RNGs, declared in one place."""

    step: int = 0  # optimizer steps done
    data: dict = field(default_factory=lambda: {"epoch": 0, "batch": 0})  # DataStream position
    elapsed: float = 0.0  # training seconds before this process started (metrics' `time`)


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {name: g.get_state() for name, g in generators.items()}
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def export_transformer(engine, path: Path, rank: int) -> None:
    """Write the engine's module with `save_pretrained` (gathering ZeRO-3 shards first; collective)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if rank == 0:
                module.save_pretrained(path)
    elif rank == 0:
        module.save_pretrained(path)


class Checkpointer:
    """Saves and finds checkpoints under `root` (`<run_dir>/checkpoints`). All ranks call `save`/`load`."""

    def __init__(self, root: str | Path, rank: int = 0, keep: int = 2):
        self.root, self.rank, self.keep = Path(root), rank, keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "trainer_state.json").exists():
            raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
        return path

    def save(
        self,
        engine,
        state: TrainerState,
        generators: dict[str, torch.Generator],
        ema: EMA | None = None,
        config_yaml: str = "",
    ) -> Path:
        """Write checkpoint `step_{state.step:06d}` atomically, point `latest` to it, prune old ones."""
        name = f"step_{state.step:06d}"
        tmp, final = self.root / f".tmp_{name}", self.root / name
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        torch.save(rng_state(generators), tmp / f"rng_rank_{self.rank:03d}.pt")
        export_transformer(engine, tmp / "transformer", self.rank)
        if self.rank == 0:
            if ema is not None:
                torch.save(ema.state_dict(), tmp / "ema.pt")
                with ema.applied(engine.module) as module:
                    module.save_pretrained(tmp / "transformer_ema")
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        _barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.root / ".latest.tmp"
            pointer.write_text(name + "\n")
            os.replace(pointer, self.root / "latest")
            self._prune(keep_name=name)
        _barrier()
        return final

    def _prune(self, keep_name: str) -> None:
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in [p for p in steps if p.name != keep_name][: max(0, len(steps) - self.keep)]:
            shutil.rmtree(old)

    def load(
        self, path: str | Path, engine, generators: dict[str, torch.Generator], ema: EMA | None = None
    ) -> TrainerState:
        """Restore engine, EMA and RNG states from checkpoint `path`; returns its TrainerState."""
        path = Path(path)
        if not (path / "trainer_state.json").exists():
            raise FileNotFoundError(
                f"checkpoint.load: {path} is not a checkpoint dir (no trainer_state.json)"
            )
        load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG)
        if load_path is None:
            raise FileNotFoundError(f"checkpoint.load: no DeepSpeed state in {path / DS_TAG}")
        rng_file = path / f"rng_rank_{self.rank:03d}.pt"
        if rng_file.exists():  # absent when resuming on more ranks than saved: keep the fresh seeds
            set_rng_state(torch.load(rng_file, weights_only=False), generators)
        if ema is not None:
            ema_file = path / "ema.pt"
            if ema_file.exists():
                ema.load_state_dict(torch.load(ema_file))
            else:  # EMA turned on mid-run: start averaging from the loaded weights
                ema.shadow = EMA(engine.module, ema.decay).shadow
        return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def resolve_transformer_dir(path: str | Path, use_ema: bool = False) -> Path:
    """The diffusers transformer folder for `path`: a run dir (its `checkpoints/latest`), a checkpoints dir,
    a checkpoint dir (its `transformer/` or `transformer_ema/`), or a diffusers folder (has config.json)."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if (root / "latest").is_file():
            path = Checkpointer(root).latest()
            break
    if (path / "trainer_state.json").exists():
        sub = "transformer_ema" if use_ema else "transformer"
        if not (path / sub / "config.json").exists():
            hint = " (was the run trained with ema.enabled=true?)" if use_ema else ""
            raise FileNotFoundError(f"checkpoint={path}: no {sub}/ export{hint}")
        return path / sub
    if use_ema:
        raise ValueError(f"use_ema=true needs a checkpoint dir with transformer_ema/, got {path}")
    if (path / "config.json").exists():
        return path
    raise FileNotFoundError(
        f"checkpoint={path}: expected a run dir (with checkpoints/latest), a checkpoint dir (with "
        "trainer_state.json) or a diffusers transformer folder (with config.json)"
    )
