"""What a process that seems hung is doing: `kill -USR2 <pid>` prints its stacks.

Standard library only, so train.py registers it before anything heavy is imported (its
`--help` stays free of torch), and every loader worker registers it too
(`distributed.ignore_stop_signals`): workers start from a fork server, so they inherit
nothing from the rank.
"""

from __future__ import annotations

import faulthandler
import signal
import sys

#: `kill -USR2 <pid>` makes a rank or one of its data loader workers print every thread's stack
#: to stderr and go on: what a run that seems hung is doing, with no debugger on the node.
#: SIGUSR1 and SIGTERM are the stop signals (engine/preemption.py).
STACK_SIGNAL = signal.SIGUSR2


def print_stacks_on_signal() -> None:
    """`STACK_SIGNAL` prints every thread's stack to the process's own stderr (fd 2: the
    launcher's or Slurm's log), also when `sys.stderr` was replaced (pytest's capture)."""
    if sys.__stderr__ is not None:
        faulthandler.register(STACK_SIGNAL, file=sys.__stderr__, all_threads=True)
