#!/usr/bin/env python
"""Convert a weight file of another layout onto a timm model, as safetensors.

A thin wrapper of the console script `cssr-convert-weights` (the package is installed editable: `pip
install -e .`); the program is `cssr_dist.apps.convert_weights`, see `--help`.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm is imported: these never need the network

from cssr_dist.apps.convert_weights import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
