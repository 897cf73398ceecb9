#!/usr/bin/env python
"""Paper-style table from finished runs: rows methods (x scores), columns data sets, cells
mean ± std over splits; lists missing and unfinished runs. Logic: cssr_dist/results.py.

    python tools/collect_metrics.py runs/ --metric auroc --scores primary msp mls energy
    python tools/collect_metrics.py runs/ --metric oscr --format latex --percent
    python tools/collect_metrics.py runs/ --source wandb          # from the offline W&B files
    python tools/collect_metrics.py runs/ --datasets mnist --methods linear rcssr   # expect a sweep grid
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cssr_dist.errors import CssrError  # noqa: E402
from cssr_dist.results import build_table, render, scan  # noqa: E402
from cssr_dist.sweep import expand  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders, or folders holding them (e.g. runs/)")
    p.add_argument("--metric", default="auroc", help="summary key: auroc, oscr (reference protocol: oscr_to_1), closed_acc, aupr_in, fpr95, ...")
    p.add_argument("--scores", nargs="+", default=["primary"],
                   help="primary (each run's own) and/or score names: integrated s0 s1 s2 msp mls energy")
    p.add_argument("--set", default="test", dest="eval_set", help="test, or an OOD set name")
    p.add_argument("--source", choices=["folders", "wandb"], default="folders")
    p.add_argument("--wandb-prefix", default="final", help="W&B key prefix of the final evaluation")
    p.add_argument("--format", choices=["markdown", "csv", "latex"], default="markdown")
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--percent", action="store_true", help="x100, as the paper's tables")
    p.add_argument("--datasets", nargs="+", help="expected grid (as tools/sweep.py): lists missing runs")
    p.add_argument("--methods", nargs="+", default=["linear", "pcssr", "rcssr"])
    p.add_argument("--splits", nargs="+")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--tag", default="")
    p.add_argument("--output", help="write the table here as well as to stdout")
    args = p.parse_args(argv)
    try:
        results = scan(args.paths, args.source, args.wandb_prefix)
        expected = (expand(args.datasets, args.methods, args.splits, args.seeds, args.tag, ROOT / "configs")
                    if args.datasets else None)
        table = build_table(results, args.metric, args.scores, args.eval_set, expected)
    except CssrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = render(table, args.format, args.digits, 100.0 if args.percent else 1.0)
    print(text, end="")
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
