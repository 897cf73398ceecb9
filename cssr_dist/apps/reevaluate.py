"""Evaluate one finished run's best checkpoint again under evaluation variants, same weights.

Answers "does this evaluation option change the numbers?" without retraining: BatchNorm
recalibration (`eval.recalibrate_bn`) and the score statistics' transform
(`eval.stats_transform`, test | train = the reference protocol). For each variant it refits
the score statistics from the training images (as the end of training does), then prints
closed-set accuracy, OSCR and AUROC of every score (integrated, s0, s1, s2, msp, mls,
energy), the primary score's metrics under both protocols' definitions side by side (AUPR,
FPR95, OSCR: what a definition alone changes) and the integrated score's term moments: a
term with a small std gets a large weight (1/std) in `integrated`. Two combinations fitted
on the validation KNOWNS only (`val_z`, `val_rank`, see `validation_combinations`) are
reported beside them; nothing here looks at test labels to choose anything. Nothing is
written to the run folder.

    cssr-reevaluate runs/NAME --variants base recal stats_train --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..config import Config, load_config, parse_override
from ..distributed import eval_module
from ..engine.runner import Run
from ..errors import ConfigError, CssrError, report
from ..eval import metrics

VARIANTS = {
    "base": [],
    "recal": ["eval.recalibrate_bn=true"],
    "norecal": ["eval.recalibrate_bn=false"],
    "stats_train": ["eval.stats_transform=train"],
}


def validation_combinations(val: dict, test: dict, terms) -> dict:
    """Two ways to add the terms with moments / quantiles of the validation knowns instead of the
    training images: `val_z` (z-scores), `val_rank` (sum of log empirical CDF: robust to the
    heavy tail of S2, whose Gram power 8 makes a few images dominate its std)."""
    val_z = np.zeros(len(test["labels"]))
    val_rank = np.zeros(len(test["labels"]))
    for n in terms:
        ref = np.sort(np.asarray(val[n], dtype=np.float64))
        x = np.asarray(test[n], dtype=np.float64)
        val_z += (x - ref.mean()) / (ref.std() + 1e-8)
        cdf = (np.searchsorted(ref, x, side="right") + 1) / (len(ref) + 1)
        val_rank += np.log(cdf)
    return {"val_z": val_z, "val_rank": val_rank}


def protocol_overridden(cfg: Config, overrides: list[str]) -> list[str]:
    """The `overrides` that `cfg` does not hold: the run's protocol replaced them (`eval.protocol=reference`
    forces e.g. `eval.recalibrate_bn=false` whatever the config says), so a variant built on them
    would silently evaluate the same thing as `base` under its own name."""
    lost = []
    for text in overrides:
        key, wanted = parse_override(text)
        section, name = key.split(".")
        actual = getattr(getattr(cfg, section), name)
        if actual != wanted:
            lost.append(f"{key}={text.split('=', 1)[1]} (eval.protocol={cfg.eval.protocol} sets {actual})")
    return lost


def variant_config(run_dir: Path, overrides: list[str]) -> Config:
    """The run's config under a variant's `overrides`; ConfigError when its protocol overrides them."""
    cfg = load_config(str(run_dir / "config.yaml"), [*overrides, "tracking.wandb=false", "run.progress=false",
                                                      f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}"])
    lost = protocol_overridden(cfg, overrides)
    if lost:
        raise ConfigError(f"{run_dir}: this variant cannot apply, the run's protocol overrides {', '.join(lost)}; "
                          "choose another variant for this run")
    return cfg


def evaluate_variant(run_dir: Path, overrides: list[str]) -> dict:
    """One variant: the run's best weights, statistics refitted under `overrides`; nothing written."""
    cfg = variant_config(run_dir, overrides)
    run = Run(cfg, test_only=True)
    captured: dict = {}
    run.evaluator.on_evaluation = lambda summary, per_set: captured.update(per_set)  # no files, no W&B
    run.load_best()
    run.model = run.accelerator.prepare(run.model)
    summary = run.evaluator.evaluate(run.model, fit=True)
    test = captured["test"]
    known = test["labels"] >= 0
    skip = ("pred", "labels", "ids")
    terms = run.scorer.stats.score_names
    auroc = {k: metrics.auroc(np.asarray(v)[known], np.asarray(v)[~known]) for k, v in test.items() if k not in skip}
    if run.data.val is not None:  # combinations fitted on the validation KNOWNS only (no unknowns, no test data)
        val = run.evaluator.scores(eval_module(run.accelerator, run.model), run.data.val, "val")
        for name, combined in validation_combinations(val, test, terms).items():
            auroc[name] = metrics.auroc(combined[known], combined[~known])
    primary = run.scorer.primary
    definitions = metrics.protocol_metrics(test[primary], test["pred"], test["labels"], run.data.meta.num_classes,
                                           "clean", side_by_side=True)
    oscr = summary.get("oscr", summary.get("oscr_to_1"))  # the run's protocol's OSCR
    out = {"overrides": overrides, "closed_acc": summary["closed_acc"], "oscr": oscr, "auroc": auroc,
           "definitions": {k: v for k, v in definitions.items() if k not in ("closed_acc", "auroc", "macro_f1")},
           "term_mean_std": {n: [float(t) for t in run.scorer.stats.zstats(n)] for n in terms},
           "term_test_std": {n: float(np.std(test[n][known])) for n in terms}}
    run.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--variants", nargs="+", default=["base"], choices=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        for name in args.variants:  # every variant checked before the first (slow) evaluation
            variant_config(args.run_dir, VARIANTS[name])
        results = {name: evaluate_variant(args.run_dir, VARIANTS[name]) for name in args.variants}
    except CssrError as err:
        return report(err)
    for name, r in results.items():
        aurocs = " ".join(f"{k} {v:.4f}" for k, v in r["auroc"].items())
        stds = " ".join(f"{k} {s:.4g}" for k, (_, s) in r["term_mean_std"].items())
        print(f"{name}: closed_acc {r['closed_acc']:.4f} oscr {r['oscr']:.4f} | auroc {aurocs} | term std {stds}")
        print(f"{name} definitions: " + " ".join(f"{k} {v:.4f}" for k, v in r["definitions"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
