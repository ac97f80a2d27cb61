"""One stage of a multi-stage script (scripts/quality.py, scripts/scale_runs.py) as a child process that a
time limit or a preemption stops without losing work.

A SIGTERM or SIGINT to the script is passed on to the stage running (train.py then finishes its step,
saves a checkpoint and exits 0; the deepspeed launcher and torchrun pass it to their ranks) instead of
killing the script and orphaning the stage. The caller then ends the script: the same command continues
from what was kept (`timeout -s TERM 540 python scripts/quality.py` on a device with a 10-minute limit).
"""

from __future__ import annotations

import signal
import subprocess


def run_stage(cmd: list[str], **popen) -> tuple[int, int]:
    """Run `cmd` (`subprocess.Popen` keyword arguments: cwd, env, stdout, ...) to its end, passing on
    SIGTERM / SIGINT. Returns (its exit code, the first signal passed on or 0)."""
    child = subprocess.Popen(cmd, **popen)
    stops: list[int] = []

    def forward(signum: int, frame) -> None:
        stops.append(signum)
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code, (stops[0] if stops else 0)


def stopped_message(script: str, signum: int, what: str, code: int) -> str:
    return (
        f"{script}: {signal.Signals(signum).name} during {what} (its command exited {code}); the same "
        "command continues from there"
    )
