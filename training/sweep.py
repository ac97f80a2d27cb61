"""Hydra glue for sweeps: the `run_dirname` resolver naming each job's dir, and a callback that writes the
sweep's summary table (CSV + markdown) at the end of a multirun."""

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from training.summary import write_sweep_table


def run_dirname(job_num: int, override_dirname: str, max_len: int = 120) -> str:
    """A sweep job's sub-directory: `03_attention=full,train.lr=0.001`; path separators in override values
    (`data.source=/a/b`) become `_` and long names are cut (the job number keeps them unique)."""
    return f"{int(job_num):02d}_{override_dirname.replace('/', '_')}"[:max_len]


class SweepSummary(Callback):
    """Registered in configs/train.yaml under `hydra.callbacks`; a no-op for single runs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = write_sweep_table(config.hydra.sweep.dir)
        print(f"sweep summary of {len(rows)} runs: {config.hydra.sweep.dir}/summary.md")


OmegaConf.register_new_resolver("run_dirname", run_dirname, replace=True)
