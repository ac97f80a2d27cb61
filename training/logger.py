"""Rank-0 logging: metrics.jsonl / eval.jsonl in the run dir, wandb (offline by default), progress bar."""

import json
import logging
import math
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from training.config import WandbConfig

_log = logging.getLogger(__name__)


def _plain(value):
    """Tensors and numpy scalars become floats so that every record is JSON (non-finite as null)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _rewind_jsonl(path: Path, step: int) -> None:
    """Drop records after `step` (written by a run that crashed after its last checkpoint)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


class RunLogger:
    """Writes `metrics.jsonl`, `eval.jsonl`, wandb logs and the console progress bar; a no-op when not
    `enabled` (ranks other than 0). The wandb run id is kept in `<run_dir>/wandb/run_id` so a resumed run
    continues the same wandb run."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: WandbConfig,
        *,
        name: str,
        config: dict,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
    ):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for file in ("metrics.jsonl", "eval.jsonl"):
            _rewind_jsonl(self.run_dir / file, start_step)
        if cfg.mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb" / "run_id"
            id_file.parent.mkdir(exist_ok=True)
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                project=cfg.project, entity=cfg.entity, name=name, group=cfg.group, tags=list(cfg.tags),
                config=config, dir=str(self.run_dir), mode=cfg.mode, id=run_id, resume="allow",
            )  # fmt: skip
        self.bar = tqdm(total=total_steps, initial=start_step, desc=name or "train", dynamic_ncols=True)

    def _write(self, file: str, step: int, metrics: dict, prefix: str = "") -> dict:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.run_dir / file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(
                {prefix + k: v for k, v in record.items() if k != "step" and v is not None}, step=step
            )
        return record

    def log(self, step: int, metrics: dict) -> None:
        """One training record: `metrics.jsonl` + wandb + the progress bar's postfix."""
        if not self.enabled:
            return
        record = self._write("metrics.jsonl", step, metrics)
        self.bar.n = step
        self.bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "lr") if record.get(k) is not None})

    def log_eval(self, step: int, metrics: dict) -> None:
        """One evaluation record: `eval.jsonl` + wandb (under `eval/`)."""
        if not self.enabled:
            return
        record = self._write("eval.jsonl", step, metrics, prefix="eval/")
        shown = {k: v for k, v in record.items() if k == "val_loss" or k.startswith("recall/mean")}
        self.bar.write(
            f"eval step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items() if v is not None)
        )

    def log_videos(self, step: int, videos: dict[str, Path], captions: dict[str, str] | None = None) -> None:
        """Attach sampled mp4s to wandb as videos (`samples/prompt_00`, ...), each captioned with its prompt.

        No `fps`: an mp4 carries its frame rate, and wandb warns once per video that `fps` is ignored for a
        file path."""
        if self.enabled and self.wandb is not None:
            import wandb

            captions = captions or {}
            self.wandb.log(
                {
                    f"samples/{k}": wandb.Video(str(p), caption=captions.get(k), format="mp4")
                    for k, p in videos.items()
                },
                step=step,
            )

    def write(self, message: str) -> None:
        """A line on the console (above the progress bar) and in the run's `train.log` under Hydra."""
        if not self.enabled:
            return
        if logging.getLogger().handlers:  # Hydra's console + file handlers; the console one via tqdm
            with logging_redirect_tqdm():
                _log.info(message)
        else:
            self.bar.write(message)

    @contextmanager
    def timed(self, what: str, step: int) -> Iterator[None]:
        """`step N: <what> ...` before and `step N: <what> took X.X s` after a long pause of the loop (eval,
        sampling, a checkpoint), on the console and in `train.log`, so a silent minute is explained."""
        self.write(f"step {step}: {what} ...")
        start = time.perf_counter()
        yield
        self.write(f"step {step}: {what} took {time.perf_counter() - start:.1f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory in GiB since the last call; on CPU the process's peak resident memory."""
    if device.type != "cuda":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak
