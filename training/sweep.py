"""Hydra glue for sweeps: the `run_dirname` resolver naming each job's dir, and a callback that keeps the
sweep's summary table (CSV + markdown) up to date as each job of a multirun ends, failed jobs included."""

import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from training.summary import ERROR_FILE, write_job_error, write_sweep_table

log = logging.getLogger(__name__)


def run_dirname(job_num: int, override_dirname: str, max_len: int = 120) -> str:
    """A sweep job's sub-directory: `03_attention=full,train.lr=0.001`; path separators in override values
    (`data.source=/a/b`) become `_` and long names are cut (the job number keeps them unique)."""
    return f"{int(job_num):02d}_{override_dirname.replace('/', '_')}"[:max_len]


class SweepSummary(Callback):
    """Registered in configs/train.yaml under `hydra.callbacks`; a no-op for single runs.

    The table is written at each job's end, not once at the multirun's: Hydra's sweeper raises on the
    first failed job's exception after the jobs ran and never calls `on_multirun_end` then, so a sweep
    with one failed job would otherwise have no table at all."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # Every rank of a `deepspeed train.py -m` runs the callbacks; rank 0 writes.
        if config.hydra.mode != RunMode.MULTIRUN or os.environ.get("RANK", "0") != "0":
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            # The exception itself: the public `return_value` re-raises it (the sweeper does that later).
            error = job_return._return_value
            write_job_error(job_dir, error)
            log.error("sweep job %s failed: %s: %s", job_dir.name, type(error).__name__, error)
        else:
            (job_dir / ERROR_FILE).unlink(missing_ok=True)  # a re-run that finished
        write_sweep_table(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("RANK", "0") == "0":
            print(f"sweep summary: {config.hydra.sweep.dir}/summary.md")


OmegaConf.register_new_resolver("run_dirname", run_dirname, replace=True)
