"""Atomic, verified checkpoints: DeepSpeed state + diffusers export + the trainer's resumable state.

Layout of `<run_dir>/checkpoints/step_XXXXXX/`:
    deepspeed/               engine state (weights, optimizer, LR schedule) from `engine.save_checkpoint`
    transformer/             the weights in diffusers format (`from_pretrained` loads it)
    transformer_ema/         the EMA weights, when EMA is on
    lora/, lora_ema/         LoRA runs (train.lora): the adapter in diffusers and original Wan / ComfyUI
                             keys (models.lora), instead of transformer/ unless train.lora.merge_on_export
    ema.pt                   EMA state (float32 shadow weights)
    rng_rank_XXX.pt          per-rank RNG states (python, numpy, torch, cuda, named generators)
    trainer_state.json       `TrainerState`: step, data position, elapsed time
    model_index.json, scheduler/, vae/, text_encoder/, tokenizer/, README.md
                             the rest of a diffusers pipeline (training.export): `WanPipeline.from_pretrained`
                             loads the checkpoint dir; the shared parts are hard links to `../pipeline/`
    config.yaml              the resolved run config
    manifest_rank_XXX.json   the files rank XXX wrote, with their sizes and CRC-32s
    complete.json            written last, by rank 0, once every rank's manifest and files are there

Saving: every rank writes its files and its manifest into `.tmp_step_XXXXXX/`; after a barrier rank 0
checks every rank's manifest and files (a rank that wrote elsewhere, e.g. into its own run dir, fails the
save on every rank, naming it), writes `complete.json`, renames the dir and only then points `latest` (rewritten
with `os.replace`) to it: a crash leaves the previous checkpoint as `latest`.

Loading checks the same before reading anything, plus each resume file's CRC-32 (each rank checks its own
manifest's files, rank 0 the shared ones), so a truncated or corrupt file fails naming the file and the
checkpoint (`CheckpointError`), on every rank together. `Checkpointer.resume` from `latest` then falls back
to the previous kept checkpoint, logging which one it skipped and why.
"""

import json
import logging
import os
import random
import re
import shutil
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from models.families import family_of
from models.lora import adapter_metadata, adapter_state_dict, has_lora, save_adapter, save_merged
from training.ema import EMA
from training.export import PARTS_DIR, export_pipeline

log = logging.getLogger(__name__)
# Logged when a checkpoint resumes on another number of ranks (scripts/scale_runs.py looks for it).
MOMENTS_RESTART = "the optimizer's moments restart from zero"

DS_TAG = "deepspeed"
COMPLETE = "complete.json"
# For sampling and diffusers (training.export); resuming never reads them: checked for size only.
EXPORTS = ("transformer/", "transformer_ema/", "lora/", "lora_ema/", "model_index.json", "scheduler/")


def manifest_name(rank: int) -> str:
    return f"manifest_rank_{rank:03d}.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, truncated or corrupt; the message names the checkpoint and the file."""


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


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _first_error(error: str | None) -> str | None:
    """The first failing rank's error, on every rank, so that all ranks raise (and fall back) together."""
    if _world_size() == 1:
        return error
    errors: list[str | None] = [None] * _world_size()
    dist.all_gather_object(errors, error)
    return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _what_to_do(checkpoint: Path) -> str:
    kept = sorted(p.name for p in checkpoint.parent.glob("step_*") if p.is_dir() and p != checkpoint)
    older = f"an older kept one ({', '.join(kept)})" if kept else "an older checkpoint"
    return (
        f"Resuming from `latest` skips it by itself; to pick {older} set checkpoint.load=<its dir>, or start "
        "afresh in a new run dir (hydra.run.dir=...)."
    )


def _unreadable(checkpoint: Path, file: Path, err: Exception) -> CheckpointError:
    reason = (str(err).splitlines() or [""])[0][:200]
    return CheckpointError(
        f"checkpoint {checkpoint}: cannot read {file.relative_to(checkpoint)} ({type(err).__name__}: "
        f"{reason}); the file is truncated or corrupt. {_what_to_do(checkpoint)}"
    )


def _read_json(checkpoint: Path, file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _unreadable(checkpoint, file, err) from err


def _torch_load(checkpoint: Path, file: Path):
    try:
        return torch.load(file, weights_only=False)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a bad file
        raise _unreadable(checkpoint, file, err) from err


def write_export(module, path: Path, merge_lora: bool = False) -> list[Path]:
    """Write `module` as the diffusers folder `path` (`transformer/`) with `save_pretrained`; returns what
    it wrote. A module with LoRA adapters (`train.lora`) writes the adapter files into `lora/` beside it
    instead (`transformer_ema/` -> `lora_ema/`; `models.lora.save_adapter`: diffusers and, for Wan, the
    original Wan / ComfyUI keys) and, with `merge_lora`, the merged transformer as `path`."""
    if not has_lora(module):
        module.save_pretrained(path)
        return [path]
    lora_dir = path.with_name(path.name.replace("transformer", "lora"))
    wan = family_of(module).name == "wan"  # the original-key table is Wan's
    written = [save_adapter(adapter_state_dict(module), adapter_metadata(module), lora_dir, original=wan)]
    if merge_lora:
        written.append(save_merged(module, path))
    return written


def export_transformer(engine, path: Path, rank: int, merge_lora: bool = False) -> list[Path]:
    """`write_export` of the engine's module on rank 0 (gathering ZeRO-3 shards first: collective, every
    rank calls it; with LoRA and no merge only the adapters are gathered). Returns what rank 0 wrote."""
    module = engine.module
    if engine.zero_optimization_stage() != 3:
        return write_export(module, path, merge_lora) if rank == 0 else []
    import deepspeed

    lora_only = has_lora(module) and not merge_lora
    params = [p for p in module.parameters() if p.requires_grad or not lora_only]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return write_export(module, path, merge_lora) if rank == 0 else []


def _deepspeed_files(engine, save_dir: Path) -> list[Path]:
    """The files `engine.save_checkpoint(save_dir, tag=DS_TAG)` writes on this rank, by DeepSpeed's own
    naming: the module states (data-parallel rank 0; every rank under ZeRO-3) and the rank's ZeRO
    optimizer partition. A name DeepSpeed did not write shows up as missing in the completeness check."""
    files = []
    if engine.save_non_zero_checkpoint:
        files.append(Path(engine._get_ckpt_name(str(save_dir), DS_TAG)))
    if engine.save_zero_checkpoint:
        files.append(Path(engine._get_zero_ckpt_name(str(save_dir), DS_TAG)))
    return files


def _write_manifest(checkpoint: Path, rank: int, files: list[Path]) -> None:
    entries = {}
    for file in files:
        for f in sorted(file.rglob("*")) if file.is_dir() else [file]:
            if f.is_file():
                entries[str(f.relative_to(checkpoint))] = {"size": f.stat().st_size, "crc32": _crc32(f)}
            elif not f.exists():
                entries[str(f.relative_to(checkpoint))] = {"size": None, "crc32": None}
    manifest = {"rank": rank, "world_size": _world_size(), "files": entries}
    (checkpoint / manifest_name(rank)).write_text(json.dumps(manifest, indent=1))


def check_files(checkpoint: Path, world_size: int, crc_ranks: tuple[int, ...] = ()) -> list[str]:
    """What is missing or wrong in `checkpoint` by its ranks' manifests: every rank's manifest, every
    listed file with its size, and for the ranks in `crc_ranks` the CRC-32 of the files resuming reads."""
    problems = []
    for rank in range(world_size):
        file = checkpoint / manifest_name(rank)
        if not file.is_file():
            problems.append(
                f"rank {rank} wrote no {file.name} (did it fail, or save into another directory, e.g. a "
                "run dir of its own?)"
            )
            continue
        try:
            entries = json.loads(file.read_text())["files"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError) as err:
            problems.append(f"{file.name} is unreadable ({type(err).__name__}: {err})")
            continue
        for rel, meta in entries.items():
            path = checkpoint / rel
            if meta["size"] is None or not path.is_file():
                problems.append(f"rank {rank}'s {rel} is missing")
            elif path.stat().st_size != meta["size"]:
                problems.append(
                    f"rank {rank}'s {rel} has {path.stat().st_size} bytes, {meta['size']} were written "
                    "(truncated?)"
                )
            elif rank in crc_ranks and not rel.startswith(EXPORTS) and _crc32(path) != meta["crc32"]:
                problems.append(f"rank {rank}'s {rel} is corrupt (its CRC-32 differs from the one written)")
    return problems


def is_complete(checkpoint: Path) -> bool:
    """Marked complete; or written before manifests existed (trainer_state.json, written last by rank 0)."""
    if (checkpoint / COMPLETE).is_file():
        return True
    return (checkpoint / "trainer_state.json").is_file() and not any(checkpoint.glob("manifest_rank_*"))


def verify(checkpoint: str | Path, rank: int = 0, world_size: int = 1) -> int:
    """Check that `checkpoint` is complete and intact (this process being `rank` of `world_size`: it checks
    the CRC-32s of the manifests `rank`, `rank + world_size`, ...); returns the world size it was saved
    with. Raises CheckpointError listing everything missing, truncated or corrupt."""
    checkpoint = Path(checkpoint)
    if not is_complete(checkpoint):
        what = "is not a checkpoint dir" if not checkpoint.is_dir() else f"has no {COMPLETE}"
        raise CheckpointError(
            f"checkpoint {checkpoint} {what}: its save did not finish on every rank. {_what_to_do(checkpoint)}"
        )
    if not (checkpoint / COMPLETE).is_file():  # the older format: nothing to check against
        return max(1, len(list(checkpoint.glob("rng_rank_*.pt"))))
    saved_world = int(_read_json(checkpoint, checkpoint / COMPLETE)["world_size"])
    problems = check_files(checkpoint, saved_world, tuple(range(rank, saved_world, world_size)))
    if problems:
        raise CheckpointError(
            f"checkpoint {checkpoint} is incomplete or corrupt:\n  " + "\n  ".join(problems) + "\n"
            + _what_to_do(checkpoint)
        )  # fmt: skip
    return saved_world


# Called with (checkpoint dir, the world size it was saved with) once the files are verified and before
# anything is loaded; raises to refuse the checkpoint (e.g. `training.resume.ResumePlan.check`).
ResumeCheck = Callable[[Path, int], None]


class Checkpointer:
    """Saves and finds checkpoints under `root` (`<run_dir>/checkpoints`). All ranks call `save`/`load`."""

    def __init__(self, root: str | Path, rank: int = 0, keep: int = 2, merge_lora: bool = False):
        self.root, self.rank, self.keep = Path(root), rank, keep
        self.merge_lora = merge_lora  # LoRA runs: also export the merged transformer (train.lora)

    def latest(self) -> Path | None:
        """The complete checkpoint `latest` names, None without a `latest`; CheckpointError if unusable."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{pointer} is unreadable ({type(err).__name__}: {err})") from err
        path = self.root / name
        if not re.fullmatch(r"step_\d+", name) or not is_complete(path):
            raise CheckpointError(
                f"{pointer} names {name[:80]!r}, which is not a complete checkpoint in {self.root}"
            )
        return path

    def save(
        self,
        engine,
        state: TrainerState,
        generators: dict[str, torch.Generator],
        ema: EMA | None = None,
        config_yaml: str = "",
    ) -> Path:
        """Write checkpoint `step_{state.step:06d}` atomically, point `latest` to it, prune old ones.
        Raises CheckpointError on every rank (leaving `latest` as it was) if a rank's files are missing."""
        name = f"step_{state.step:06d}"
        tmp, final = self.root / f".tmp_{name}", self.root / name
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        tmp.mkdir(parents=True, exist_ok=True)  # a rank with another root still writes, to be found missing
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        written = [*_deepspeed_files(engine, tmp), tmp / f"rng_rank_{self.rank:03d}.pt"]
        torch.save(rng_state(generators), written[-1])
        written += export_transformer(engine, tmp / "transformer", self.rank, self.merge_lora)
        if ema is not None:  # every rank: under ZeRO-3 swapping the averages in and exporting gather shards
            with ema.applied(engine.module):
                written += export_transformer(engine, tmp / "transformer_ema", self.rank, self.merge_lora)
        if self.rank == 0:
            if ema is not None:
                torch.save(ema.state_dict(), tmp / "ema.pt")
                written += [tmp / "ema.pt"]
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
            written += [tmp / "config.yaml", tmp / "trainer_state.json"]
            if config_yaml:  # the rest of a diffusers pipeline around transformer/ (training.export)
                written += export_pipeline(tmp, config_yaml, self.root / PARTS_DIR)
        _write_manifest(tmp, self.rank, written)
        _barrier()
        verdict = [None]
        if self.rank == 0 and (problems := check_files(tmp, _world_size())):
            verdict = [
                f"checkpoint {tmp} was not marked complete and {self.root / 'latest'} is unchanged: "
                + "; ".join(problems)
            ]
        if _world_size() > 1:
            dist.broadcast_object_list(verdict, src=0)  # every rank raises rank 0's verdict
        if verdict[0]:
            raise CheckpointError(verdict[0])
        if self.rank == 0:
            (tmp / COMPLETE).write_text(json.dumps({"step": state.step, "world_size": _world_size()}))
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
        self,
        path: str | Path,
        engine,
        generators: dict[str, torch.Generator],
        ema: EMA | None = None,
        check: ResumeCheck | None = None,
    ) -> TrainerState:
        """Restore engine, EMA and RNG states from checkpoint `path`; returns its TrainerState. Every file
        is verified and read before any state changes; a bad one raises CheckpointError on every rank."""
        path = Path(path)
        try:
            saved_world = verify(path, self.rank, _world_size())
            state = _read_json(path, path / "trainer_state.json")
            try:
                state = TrainerState(**state)
            except TypeError as err:
                raise _unreadable(path, path / "trainer_state.json", err) from err
            rng_file = path / f"rng_rank_{self.rank:03d}.pt"
            # Absent when resuming on more ranks than saved: those keep their fresh seeds.
            rng = _torch_load(path, rng_file) if rng_file.exists() else None
            ema_state = _torch_load(path, path / "ema.pt") if ema and (path / "ema.pt").exists() else None
            error = None
        except CheckpointError as err:
            error = str(err)
        error = _first_error(error)
        if error:
            raise CheckpointError(error)
        if check is not None:
            check(path, saved_world)
        # ZeRO's optimizer shards are cut for the number of ranks that saved them: on another number the
        # weights, LR schedule and counters load and Adam's moments restart from zero (docs/training.md).
        resharded = saved_world != _world_size()
        try:
            load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=not resharded)
        except Exception as err:  # files verified above: a mismatch (another model, ZeRO stage)
            raise CheckpointError(
                f"checkpoint {path}: DeepSpeed could not load {path / DS_TAG} ({type(err).__name__}: {err})"
            ) from err
        if load_path is None:
            raise CheckpointError(f"checkpoint {path}: no DeepSpeed state in {path / DS_TAG}")
        if resharded:
            # A fresh optimizer holds the schedule's first LR until its next step: take the restored one.
            for group, lr in zip(
                engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True
            ):
                group["lr"] = lr
            if self.rank == 0:
                log.warning(
                    "checkpoint %s was saved by %d ranks and resumes on %d: weights, LR schedule, step, EMA and "
                    "data epoch restored; %s (ZeRO shards its states per rank)", path, saved_world, _world_size(),
                    MOMENTS_RESTART,
                )  # fmt: skip
        if rng is not None:
            set_rng_state(rng, generators)
        if ema is not None:
            if ema_state is not None:
                ema.load_state_dict(ema_state)
            else:  # EMA turned on mid-run: start averaging from the loaded weights
                ema.shadow = EMA(engine.module, ema.decay).shadow
        return state

    def resume(
        self,
        load: str | Path | None,
        engine,
        generators: dict[str, torch.Generator],
        ema: EMA | None = None,
        check: ResumeCheck | None = None,
        from_latest: bool = True,
    ) -> tuple[Path | None, TrainerState]:
        """Load `load` when set (a bad checkpoint raises); else, when `from_latest`, the checkpoint `latest`
        names, falling back to older kept ones (newest first) with a warning when it is unreadable. Returns
        (the checkpoint loaded, its state), or (None, a fresh state) when there is none."""
        if load:
            return Path(load), self.load(load, engine, generators, ema, check)
        if not from_latest:
            return None, TrainerState()
        kept = sorted((p for p in self.root.glob("step_*") if p.is_dir()), reverse=True)
        try:
            target = self.latest()
        except CheckpointError as err:
            target = None
            if self.rank == 0:
                log.warning(f"{err}; trying the kept checkpoints, newest first")
        else:
            if target is None and kept and self.rank == 0:  # a crash before the first `latest` was written
                log.warning(f"{self.root} has checkpoints but no `latest`: trying them, newest first")
        if target is not None:
            kept = [target] + [p for p in kept if p.name < target.name]
        skipped = []
        for path in kept:
            try:
                state = self.load(path, engine, generators, ema, check)
            except CheckpointError as err:
                skipped.append(f"{path.name}: {err}")
                if self.rank == 0:
                    log.warning(f"skipping checkpoint {path}: {err}")
                continue
            if skipped and self.rank == 0:
                log.warning(f"resumed from the older checkpoint {path} ({len(skipped)} newer one(s) skipped)")
            return path, state
        if skipped:
            raise CheckpointError(
                f"no checkpoint in {self.root} can be loaded:\n" + "\n".join(skipped)
                + "\nStart afresh in a new run dir (hydra.run.dir=...) or restore the files."
            )  # fmt: skip
        return None, TrainerState()


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
