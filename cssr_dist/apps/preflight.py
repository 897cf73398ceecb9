"""`python -m cssr_dist.apps.preflight [--processes N] --config C [key=value ...]`: check a run first.

Takes train.py's arguments, and `--processes N`: the job's processes (GPUs), each of which
streams whole shards, so every shard set needs N shards at least (default 1). Prints the run
folder (stdout) when the run may start; otherwise one `preflight:` line per problem (stderr)
and exit status 2. `slurm/job.sh` runs it on the batch host before `srun` (with the job's
processes); `cssr-sweep --slurm` runs the same checks before `sbatch`. What it checks:
`cssr_dist/engine/preflight.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..cli import config_from_args, parse
from ..engine.preflight import preflight
from ..errors import ConfigError, CssrError, report


def split_processes(argv: list[str]) -> tuple[list[str], int]:
    """`--processes N` (the job's processes: every shard set needs one shard each) taken out of
    train.py's arguments."""
    rest, world = list(argv), 1
    if "--processes" in rest:
        at = rest.index("--processes")
        value = rest[at + 1] if at + 1 < len(rest) else ""
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--processes {value!r}: give the job's number of processes (1 or more)")
        world = int(value)
        del rest[at:at + 2]
    return rest, world


def main(argv: list[str] | None = None) -> int:
    try:
        args, world_size = split_processes(sys.argv[1:] if argv is None else argv)
        cfg = config_from_args(parse(args))
        problems = preflight(cfg, world_size)
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
