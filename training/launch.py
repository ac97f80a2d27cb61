"""What the process launchers (`deepspeed`, `torchrun`, hostfiles) need from a Hydra entry point.

- `deepspeed train.py ...` appends `--local_rank=N` to every worker's argv, which Hydra rejects as an
  unknown override: `strip_launcher_args()` removes it (keeping the value in `LOCAL_RANK`, which the
  launcher also sets) before Hydra parses the command line.
- Hydra resolves `${now:...}` in each process, so the ranks of one run could pick different run
  directories one second apart. The `run_stamp` resolver (`hydra.run.dir: outputs/runs/${run_stamp:}`)
  gives every rank of one launch the same stamp: `VMOBA_RUN_STAMP` when set (export it for multi-node
  launches, e.g. in `.deepspeed_env`), else the start time of the launcher process that spawned the
  local ranks (the parent of every worker), else now. `agree_on_run_dir` then checks, after the process
  group exists, that every rank really has rank 0's directory, and fails naming both if not.
"""

import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

LAUNCHED = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "RANK")  # set by torchrun / the deepspeed launcher


def strip_launcher_args(argv: list[str] | None = None) -> list[str]:
    """Remove `--local_rank=N` / `--local-rank N` from `argv` (default `sys.argv`, edited in place) and put
    N into `LOCAL_RANK` unless the launcher set it already. Returns the argv."""
    argv = sys.argv if argv is None else argv
    i = 1
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:  # `--local_rank 3`: the value is the next argument
                value = argv[i + 1] if i + 1 < len(argv) else ""
                del argv[i + 1 : i + 2]
            del argv[i]
            if value:
                os.environ.setdefault("LOCAL_RANK", value)
            continue
        i += 1
    return argv


def _process_start(pid: int) -> float | None:
    """Start time of process `pid` in seconds since the epoch (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat; the first two (pid, comm) precede the split
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_stamp(fmt: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """One timestamp per launch, the same in every local rank (see the module docstring)."""
    if os.environ.get("VMOBA_RUN_STAMP"):
        return os.environ["VMOBA_RUN_STAMP"]
    started = _process_start(os.getppid()) if any(k in os.environ for k in LAUNCHED) else None
    return time.strftime(fmt, time.localtime(started if started is not None else time.time()))


def agree_on_run_dir(run_dir: str | Path) -> None:
    """Fail (on every rank) unless all ranks of the process group resolved the same run directory."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    dirs: list = [None] * dist.get_world_size()
    dist.all_gather_object(dirs, str(Path(run_dir).resolve()))
    if len(set(dirs)) > 1:
        odd = next(r for r, d in enumerate(dirs) if d != dirs[0])
        raise RuntimeError(
            f"the ranks resolved different run directories (rank 0: {dirs[0]}, rank {odd}: {dirs[odd]}); "
            "set hydra.run.dir=<one path> on every node, or export VMOBA_RUN_STAMP=<stamp> to all ranks"
        )


OmegaConf.register_new_resolver("run_stamp", run_stamp, replace=True)
