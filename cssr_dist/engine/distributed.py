"""The engine's process group settings (how long a collective waits for a missing rank).

Who reads which samples is decided by the data package (`data/readers/`); gathering
per-sample results by id lives at ground level (`cssr_dist/distributed.py`).
"""

from __future__ import annotations

import os
from datetime import timedelta

from accelerate.utils import InitProcessGroupKwargs

from ..errors import ConfigError


DIST_TIMEOUT_ENV = "CSSR_DIST_TIMEOUT_S"


def process_group_kwargs() -> list:
    """`Accelerator(kwargs_handlers=...)`: how long a collective waits for a missing rank.

    torch waits 30 min (gloo; NCCL 10 min) before a rank blocked in a collective gives up,
    so one hung rank idles a whole allocation that long. CSSR_DIST_TIMEOUT_S (seconds)
    shortens it; unset: torch's default. It bounds every wait between ranks, including
    rank 0's solo work behind a barrier (data preparation, writing checkpoints).
    """
    value = os.environ.get(DIST_TIMEOUT_ENV, "").strip()
    if not value:
        return []
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"{DIST_TIMEOUT_ENV}={value!r} is not a positive number of seconds")
    return [InitProcessGroupKwargs(timeout=timedelta(seconds=seconds))]
