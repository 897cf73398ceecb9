#!/usr/bin/env python
"""Run a sweep (data sets x splits x methods x seeds), locally one run after another or as a
Slurm array; finished runs are skipped and interrupted ones resume. Logic: cssr_dist/sweep.py.

    python tools/sweep.py --datasets fashion_mnist mnist --methods linear pcssr rcssr \\
        --launcher "accelerate launch --num_processes 2" -- schedule.epochs=3
    python tools/sweep.py --datasets cifar10 svhn --slurm -- data.root=/data   # sbatch osr_sweep.sh
    python tools/sweep.py ... --dry-run                                          # show the plan
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cssr_dist.errors import CssrError  # noqa: E402
from cssr_dist.apps.sweep import expand, main_launcher_default, run_local, slurm_submission  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--methods", nargs="+", default=["linear", "pcssr", "rcssr"])
    p.add_argument("--splits", nargs="+", help="default: each data set's own (a-e, 0-4, default)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--tag", default="", help="run-name prefix")
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--launcher", help="command before train.py (default: this Python's `accelerate launch`)")
    p.add_argument("--slurm", action="store_true", help="submit slurm/osr_sweep.sh for the unfinished runs")
    p.add_argument("--parallel", type=int, default=8, help="Slurm: array tasks running at once")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (after --)")
    args = p.parse_args(argv)
    args.output_dir = str(Path(args.output_dir).resolve())  # runs start in the repository root
    try:
        specs = expand(args.datasets, args.methods, args.splits, args.seeds, args.tag, ROOT / "configs")
        if args.slurm:
            plan = slurm_submission(specs, args.output_dir, args.overrides, args.parallel)
            if plan is None:
                print(f"all {len(specs)} runs finished; nothing to submit")
                return 0
            cmd, env = plan
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd))
            return 0 if args.dry_run else subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}).returncode
        launcher = shlex.split(args.launcher) if args.launcher else main_launcher_default()
        outcome = run_local(specs, launcher, args.output_dir, args.overrides, cwd=ROOT, dry_run=args.dry_run)
    except CssrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [name for name, state in outcome.items() if state.startswith("failed")]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to resume them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
