#!/usr/bin/env python
"""Raw data set -> WebDataset shards + index; see `--help` and docs/shards.md.

A thin wrapper: the logic lives in `cssr_dist.data.shards.cli` (console script
`cssr-make-shards`), so it can be imported, tested and installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cssr_dist.apps.make_shards.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
