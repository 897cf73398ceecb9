"""`python -m cssr_dist.apps.preflight --config C [key=value ...]`: check a run before any node starts.

Takes train.py's arguments. Prints the run folder (stdout) when the run may start; otherwise one
`preflight:` line per problem (stderr) and exit status 2. `slurm/job.sh` runs it on the batch host
before `srun`; `cssr-sweep --slurm` runs the same checks before `sbatch`. What it checks:
`cssr_dist/engine/preflight.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..cli import config_from_args, parse
from ..engine.preflight import preflight
from ..errors import CssrError, report


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(parse(argv))
        problems = preflight(cfg)
    except CssrError as err:
        return report(err)
    for line in problems:
        print(f"preflight: {line}", file=sys.stderr)
    if problems:
        return 2
    print(Path(cfg.run.output_dir, cfg.run.name).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
