"""Result table from finished runs: one row per experiment (data set, method, backbone,
protocol, config fingerprint without split and seed) and score, cells mean ± std over its
splits and seeds; lists duplicated, re-evaluated, missing and unfinished runs. Logic:
results.py.

    cssr-collect runs/ --metric auroc --scores primary msp mls energy
    cssr-collect runs/ --metric auroc --set far        # near / far: group means
    cssr-collect runs/ --layout openood --scores primary knn vim --percent
    cssr-collect runs/ --metric oscr --format latex --percent
    cssr-collect runs/ --format csv --per-run           # one line per run
    cssr-collect runs/ --source wandb          # from the offline W&B files
    cssr-collect runs/ --datasets mnist --methods linear rcssr   # expect a sweep grid
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CssrError, report
from .results import build_table, render, scan
from .sweep import REPO_ROOT, expand


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders, or folders holding them (e.g. runs/)")
    p.add_argument("--metric", default="auroc",
                   help="summary key: auroc, oscr (reference protocol: oscr_to_1), closed_acc, aupr_in, fpr95_known_pos, fpr95_ood_pos, ...")
    p.add_argument("--scores", nargs="+", default=["primary"],
                   help="primary (each run's own) and/or score names: integrated s0 s1 s2 msp mls energy, and the "
                        "post-hoc detectors the runs report (eval.baselines)")
    p.add_argument("--set", default="test", dest="eval_set", help="test, near, far, or an OOD set name")
    p.add_argument("--layout", choices=["single", "openood"], default="single",
                   help="single: --metric on --set; openood: AUROC and FPR95 per OOD set plus near/far means")
    p.add_argument("--per-run", action="store_true", help="with --format csv: one line per run and cell")
    p.add_argument("--source", choices=["folders", "wandb"], default="folders")
    p.add_argument("--wandb-prefix", default="final", help="W&B key prefix of the final evaluation")
    p.add_argument("--format", choices=["markdown", "csv", "latex"], default="markdown")
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--percent", action="store_true", help="x100, as the paper's tables")
    p.add_argument("--datasets", nargs="+", help="expected grid (as cssr-sweep): lists missing runs")
    p.add_argument("--methods", nargs="+", default=["linear", "pcssr", "rcssr"])
    p.add_argument("--splits", nargs="+")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--tag", default="")
    p.add_argument("--output", help="write the table here as well as to stdout")
    args = p.parse_args(argv)
    try:
        results = scan(args.paths, args.source, args.wandb_prefix)
        expected = (expand(args.datasets, args.methods, args.splits, args.seeds, args.tag, REPO_ROOT / "configs")
                    if args.datasets else None)
        table = build_table(results, args.metric, args.scores, args.eval_set, expected, args.layout)
    except CssrError as err:
        return report(err)
    text = render(table, args.format, args.digits, 100.0 if args.percent else 1.0, args.per_run)
    print(text, end="")
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
