#!/usr/bin/env python
"""Raw data set -> WebDataset shards + index; see `--help` and docs/shards.md.

A thin wrapper of the console script `cssr-make-shards` (the package is installed editable: `pip
install -e .`); the program is `cssr_dist.apps.make_shards.cli`, see `--help`.
"""

import sys

from cssr_dist.apps.make_shards.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
