#!/usr/bin/env python
"""Paper-style tables from finished runs (methods x data sets, mean ± std over splits).

A thin wrapper of the console script `cssr-collect` (the package is installed editable: `pip
install -e .`); the program is `cssr_dist.apps.collect`, see `--help`.
"""

import sys

from cssr_dist.apps.collect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
