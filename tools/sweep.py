#!/usr/bin/env python
"""Run a sweep (data sets x splits x methods x seeds), locally or as a Slurm array.

A thin wrapper of the console script `cssr-sweep` (the package is installed editable: `pip
install -e .`); the program is `cssr_dist.apps.sweep`, see `--help`.
"""

import sys

from cssr_dist.apps.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
