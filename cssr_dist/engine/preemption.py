"""Preemption: turn SIGUSR1/SIGTERM into "finish this step, checkpoint, exit for requeue".

Slurm sends the signal shortly before a time limit or preemption (`--signal=USR1@120`);
the handler only sets a flag, because checkpointing inside a signal handler would run in
the middle of a collective and deadlock DDP. All ranks agree on the flag at step end.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import torch

REQUEUE_EXIT_CODE = 42
# set by launchers/launch.py: a file whose existence tells the launcher "a worker stopped for
# requeue", whatever exit code torchrun makes of the workers' 42 (see launch.py)
MARKER_ENV = "CSSR_PREEMPT_MARKER"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Set by a signal on any rank; `should_stop` all-reduces it so every rank stops together."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.requested = False
        self.signum: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True
        self.signum = signum

    def should_stop(self, accelerator) -> bool:
        """Collective: every rank must call it at the same step (it syncs host and device)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class Preempted(Exception):
    """Raised after the checkpoint is written; `runner.train` leaves the launcher's marker
    (`mark_preempted`) and train.py exits with REQUEUE_EXIT_CODE."""


def mark_preempted(reason: str = "checkpoint written") -> None:
    """Leave the launcher's marker (if launched by launchers/launch.py): exit for requeue."""
    path = os.environ.get(MARKER_ENV)
    if path:
        try:
            Path(path).write_text(f"pid {os.getpid()} on {socket.gethostname()} at {time.strftime('%H:%M:%S')}: "
                                  f"{reason}\n")
        except OSError:
            pass  # the launcher's scratch folder is gone: the exit code still says 42
