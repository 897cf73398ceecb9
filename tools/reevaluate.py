#!/usr/bin/env python
"""Evaluate a finished run's best checkpoint again under evaluation variants.

A thin wrapper of the console script `cssr-reevaluate` (the package is installed editable: `pip
install -e .`); the program is `cssr_dist.apps.reevaluate`, see `--help`.
"""

import sys

from cssr_dist.apps.reevaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
