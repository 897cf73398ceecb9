"""Entry point: `python launchers/launch.py [accelerate launch options] train.py [--config FILE] [key=value ...]`
(`accelerate launch` works too, but adds its own traceback after a user error's line).

Thin on purpose: everything lives in `cssr_dist.cli.main` (also the `cssr-train` console
script). User errors print one line (`error: ...`) and exit 2; a preempted run exits 42
so Slurm scripts can requeue it.
"""

import os
import sys

# Weights come from local files; without this timm retries an unreachable hub for ~47 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cssr_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
