#!/usr/bin/env python
"""Known class or `unknown` per image, from a trained run.

A thin wrapper of the console script `cssr-predict` (the package is installed editable: `pip
install -e .`); the program is `cssr_dist.apps.predict`, see `--help`.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm is imported: these never need the network

from cssr_dist.apps.predict import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
