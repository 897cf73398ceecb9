"""Keep freed batch-sized blocks in the heap of loader processes (glibc `mallopt`).

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB, the default
dynamic ceiling) with a fresh `mmap` and returns it on free, so each new batch of 64 x 3 x
224 x 224 floats (38.5 MB) page-faults all its ~9,400 pages again. Measured on the dev VM:
allocating and filling such a batch took 27.5 ms with the defaults and 9.0 ms with the heap
kept (docs/benchmarks/data.md), about 8% of the decode + transform time of its 64 images.
This is what the PyTorch CPU tuning guides get from jemalloc/tcmalloc, done in-process for
the processes that allocate batches. No effect outside glibc; `CSSR_DIST_HEAP_REUSE=0`
turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 512 * 2**20  # blocks below this come from the heap and are reused
TRIM_THRESHOLD = 1024 * 2**20  # free heap top kept before it is given back to the system
TOP_PAD = 64 * 2**20

_done = False


def keep_freed_memory() -> bool:
    """Tune this process once; True if glibc accepted the settings."""
    global _done
    if _done or os.environ.get("CSSR_DIST_HEAP_REUSE", "1") == "0":
        return _done
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    _done = all(mallopt(option, value) == 1 for option, value in
                ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    return _done


def worker_init(worker_id: int) -> None:
    """`DataLoader(worker_init_fn=...)`."""
    keep_freed_memory()
