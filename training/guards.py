"""What stops or skips a training step: preemption / Ctrl-C (`StopRequest`), non-finite steps
(`NonFiniteSteps`) and a batch that cannot be loaded (`together`). All are decided by every rank together, so that all ranks stop, skip and save at the
same step (a rank that leaves alone would hang the others in their next collective)."""

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")

# The exit status for each stop signal: a preemption that saved is a clean exit (schedulers requeue on 0
# or by their own rules); Ctrl-C exits 128 + SIGINT as shells report it.
EXIT_CODES = {int(signal.SIGTERM): 0, int(signal.SIGINT): 128 + int(signal.SIGINT)}


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def agree(values: list[float], device: torch.device) -> list[float]:
    """The element-wise maximum of `values` over every rank (one small all-reduce; local when alone)."""
    flags = torch.tensor(values, dtype=torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


class PeerFailure(RuntimeError):
    """Another rank failed where this one did not; raised so that no rank waits for one that is gone."""


def together(fetch: Callable[[], T], device: torch.device) -> T:
    """`fetch()` on every rank, failing on every rank if it fails on any: the failing ranks raise their
    own error, the others a `PeerFailure` naming them (one small all-reduce). Without it a rank that cannot
    load its batch dies while the others wait in the next collective until the launcher or a timeout
    ends them, with no word of why."""
    try:
        item, error = fetch(), None
    except Exception as err:  # re-raised below, after the others have heard of it
        item, error = None, err
    if dist.is_initialized() and dist.get_world_size() > 1:
        failed = torch.zeros(dist.get_world_size(), device=device)
        failed[dist.get_rank()] = float(error is not None)
        dist.all_reduce(failed)
        ranks = failed.nonzero().flatten().tolist()
        if ranks and error is None:
            raise PeerFailure(
                f"rank(s) {ranks} could not load their batch (their error is in their log); stopping"
            )
    if error is not None:
        raise error
    return item


class StopRequest:
    """SIGTERM / SIGINT handlers that only record the signal: the loop finishes its optimizer step, the
    ranks agree (`agree`, a signal delivered to one rank stops all), save, and exit with `exit_code`.

    A later signal (a second Ctrl-C during the save) is only reported: raising KeyboardInterrupt mid-save
    would abandon the checkpoint (saves are atomic, so the last good one would survive, but the steps since
    would be lost again). `kill -9` still ends the process at once."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal's requirement
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        # os.write: a handler may run inside a logging call, whose lock it must not take again.
        name = signal.Signals(signum).name
        if not self.signum:
            self.signum = signum
            os.write(2, f"\n{name}: stopping after this step with a checkpoint\n".encode())
        else:
            os.write(
                2, f"\n{name}: already stopping; the checkpoint is being saved (kill -9 to abort)\n".encode()
            )

    def restore(self) -> None:
        """Reinstall the handlers that were there before (e.g. for the caller of `train()` in a test)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class NonFiniteSteps:
    """Counts optimizer steps skipped for a NaN/Inf loss or gradient norm, and stops the run after
    `max_in_a_row` consecutive ones with what to try. The count that is logged (`skipped_steps`) is
    DeepSpeed's own (`engine.skipped_steps`, saved in its checkpoint, so it survives a resume)."""

    def __init__(self, max_in_a_row: int, verbose: bool = True):
        self.max_in_a_row, self.in_a_row, self.verbose = max_in_a_row, 0, verbose

    def ok(self) -> None:
        self.in_a_row = 0

    def skipped(self, step: int, keys: list[str], why: str) -> None:
        """Record that the attempt at optimizer step `step` was skipped (`keys`: its batches' sample keys on
        every rank); raises NonFiniteError after `max_in_a_row` in a row."""
        self.in_a_row += 1
        shown = ", ".join(keys[:16]) + (f" (+{len(keys) - 16} more)" if len(keys) > 16 else "")
        if self.verbose:
            log.warning(
                f"step {step}: {why}; update skipped (weights, step count and LR schedule unchanged; "
                f"{self.in_a_row} in a row). Samples: {shown}"
            )
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"step {step}: the loss or gradients were NaN/Inf in {self.in_a_row} consecutive steps "
                f"(train.max_nan_steps={self.max_in_a_row}); the last batch held {shown}. Try a lower "
                "train.lr (or a longer train.warmup_steps), train.precision=fp32 instead of bf16, a "
                "smaller train.grad_clip, and check the samples named above (and in the warnings before "
                "it) for NaN/Inf latents or embeddings. The last checkpoint is unchanged; resume from it."
            )


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a NaN/Inf loss or gradient norm."""
