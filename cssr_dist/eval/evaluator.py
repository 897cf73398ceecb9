"""The Evaluator: fits the score statistics, runs the one forward loop over a set,
validates, and writes the per-set report.

Statistics are fitted on known TRAINING images with test transforms, summed across ranks;
under `eval.stats_transform=train` (the reference protocol) the z-normalisation moments
alone come from the same images under the training augmentation. Thresholds for macro-F1
come from the validation slice, never the test set. Every score is reported with the same
metrics so baselines sit beside CSSR; every OOD set gets its own row, and near/far groups
their means (OpenOOD's evaluator is the pattern).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..distributed import concat_local, eval_module, gather_by_id
from ..models.bn_recalibration import recalibrate_batchnorm
from ..scoring.scores import Scorer
from . import metrics

Progress = Callable[[Iterable, str], Iterable]
#: How the test set's own unknown classes are named in the near/far group means.
TEST_UNKNOWNS = "test unknowns"


def _no_progress(iterable: Iterable, _desc: str) -> Iterable:
    return iterable


class Evaluator:
    """Evaluation of one run on this rank; `data` is the run's `RunData` (this rank's share)."""

    def __init__(self, accelerator, scorer: Scorer, data, eval_cfg, loss_fn: Callable,
                 progress: Progress | None = None, on_evaluation: Callable[[dict, dict], None] | None = None):
        """`on_evaluation(summary, per_set)` receives each finished evaluation with its
        per-sample arrays by set name ("test", "ood/<name>"): plots and dashboards."""
        self.accelerator, self.scorer, self.data, self.cfg = accelerator, scorer, data, eval_cfg
        self.loss_fn = loss_fn
        self.progress = progress or _no_progress
        self.on_evaluation = on_evaluation

    # ------------------------------------------------------------------ the one forward loop
    @torch.no_grad()
    def outputs(self, model, loader, desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(features, logits, labels, ids) per batch of `loader`, on this rank's device, in eval mode."""
        acc = self.accelerator
        model.eval()
        for images, labels, ids in self.progress(loader, desc):
            with acc.autocast():
                out = model(images.to(acc.device, non_blocking=True))
            yield out.features.float(), out.logits.float(), labels.to(acc.device), ids.to(acc.device)

    def recalibrate(self, model) -> None:
        """eval.recalibrate_bn: BatchNorm running statistics recomputed from the statistics
        images (test transforms), exactly and across ranks, before validating or scoring."""
        if self.cfg.recalibrate_bn:
            recalibrate_batchnorm(model, self.data.train_eval, self.accelerator, self.cfg.recalibrate_bn_batches)

    def fit(self, model, statistics: bool = True) -> None:
        """Fit the scorer on the training images (all ranks): its statistics (both passes: class
        statistics on `train_eval`, moments on `train_eval_augmented` where the data has it) and
        its post-hoc detectors (first pass); `statistics=False`: the detectors only."""
        acc = self.accelerator
        module = eval_module(acc, model)
        augmented = self.data.train_eval_augmented
        self.scorer.fit(lambda: self.outputs(module, self.data.train_eval, "statistics"),
                        lambda t: acc.reduce(t, reduction="sum"),
                        None if augmented is None else (lambda: self.outputs(module, augmented, "statistics (augmented)")),
                        lambda local: gather_by_id(local, acc.num_processes), module.head, statistics)

    def scores(self, module, loader, desc: str) -> dict[str, np.ndarray]:
        """Per-sample labels, ids, prediction and every score of a set, gathered from all ranks by id."""
        chunks = []
        for features, logits, labels, ids in self.outputs(module, loader, desc):
            row = dict(self.scorer(features, logits))  # float64 scores: S2 reaches 1e10
            row["labels"], row["ids"] = labels, ids
            chunks.append(row)
        return gather_by_id(concat_local(chunks), self.accelerator.num_processes)

    # ------------------------------------------------------------------ validation
    def validate(self, model) -> dict:
        """Accuracy and loss on the validation slice of known classes (model selection)."""
        if self.data.val is None:
            return {}
        self.recalibrate(model)
        acc = self.accelerator
        totals = torch.zeros(3, dtype=torch.float64, device=acc.device)  # correct, loss sum, count
        for _, logits, labels, _ in self.outputs(eval_module(acc, model), self.data.val, "val"):
            totals[0] += (self.scorer.classify(logits) == labels).sum()
            totals[1] += self.loss_fn(logits, labels).double() * labels.numel()
            totals[2] += labels.numel()
        correct, loss_sum, count = acc.reduce(totals, reduction="sum").tolist()
        return {"val_acc": correct / max(1.0, count), "val_loss": loss_sum / max(1.0, count)}

    # ------------------------------------------------------------------ the report
    def evaluate(self, model, fit: bool = True) -> dict:
        """Fit (unless restored: then the post-hoc detectors only), score validation, test and
        every OOD set once; report each."""
        started = time.perf_counter()
        read_before = self.data.corrupt_counts()
        if fit:
            self.recalibrate(model)
            self.fit(model)
        elif self.scorer.fits_detectors:  # restored statistics: the detectors from best/'s sample, else one pass
            if not self.scorer.detectors.refit_restored(eval_module(self.accelerator, model).head):
                self.fit(model, statistics=False)
        module, cfg, meta = eval_module(self.accelerator, model), self.cfg, self.data.meta
        primary = self.scorer.primary
        baselines = self.scorer.baselines
        val = self.scores(module, self.data.val, "val") if self.data.val is not None else {}
        per_set = {"test": self.scores(module, self.data.test, "test")}
        test = per_set["test"]
        report = lambda joined: score_report(joined, val, primary, baselines, meta.num_classes,  # noqa: E731
                                             cfg.tpr, cfg.protocol)
        summary = report(test)
        summary["num_test_known"] = int((test["labels"] >= 0).sum())
        summary["num_test_unknown"] = int((test["labels"] < 0).sum())
        summary["protocol"], summary["metric_keys"] = cfg.protocol, list(metrics.protocol_metric_keys(cfg.protocol))
        if metrics.NOT_REPORTED.get(cfg.protocol):
            summary["not_reported"] = dict(metrics.NOT_REPORTED[cfg.protocol])
        if meta.test_original_of is not None and (test["labels"] < 0).any():
            summary["per_unknown_class_auroc"] = per_unknown_class_auroc(
                test, primary, meta.test_original_of(test["ids"]), meta.original_class_names)
        if self.data.ood:
            for name, loader in self.data.ood.items():
                per_set[f"ood/{name}"] = join_known_and_ood(test, self.scores(module, loader, f"ood:{name}"))
            summary["ood"] = {name: report(per_set[f"ood/{name}"]) for name in self.data.ood}
            members, groups = dict(summary["ood"]), dict(meta.ood_groups)
            if summary["num_test_unknown"]:  # the split's own unknown classes: the nearest OOD there is
                members, groups = {TEST_UNKNOWNS: summary, **members}, {TEST_UNKNOWNS: "near", **groups}
            summary["ood_groups"] = group_means(members, groups)
        summary["headline_auroc"], summary["headline_auroc_of"] = headline_auroc(summary)
        # counted after every set was read (the OOD sets included), as this evaluation's reads only
        skipped = self.data.corrupt_samples(lambda t: self.accelerator.reduce(t, reduction="sum"), since=read_before)
        if skipped:  # a set that shrank under data.shards.max_corrupt_fraction says so in its results
            summary["corrupt_samples"] = skipped
        if self.scorer.detectors.not_fitted:
            summary["posthoc_not_fitted"] = dict(self.scorer.detectors.not_fitted)
        summary["eval_time_s"] = round(time.perf_counter() - started, 2)  # fit + every set (no plots, no W&B)
        if self.on_evaluation is not None:
            self.on_evaluation(summary, per_set)
        return summary


# ---------------------------------------------------------------- report helpers (pure numpy)
def _metrics_for(score: str, test: dict, val: dict, num_classes: int, tpr: float, protocol: str) -> dict:
    """The protocol's metrics of one score; the macro-F1 threshold comes from validation knowns only."""
    threshold = metrics.threshold_at_tpr(val[score], tpr) if val and len(val.get(score, [])) else None
    out = metrics.protocol_metrics(test[score], test["pred"], test["labels"], num_classes, protocol, threshold)
    out["threshold"] = float("nan") if threshold is None else threshold
    return out


def score_report(test: dict, val: dict, score: str, baselines: list[str], num_classes: int, tpr: float,
                 protocol: str = "clean") -> dict:
    """Metrics of the primary score plus a `baselines` object with the same keys per baseline."""
    report = _metrics_for(score, test, val, num_classes, tpr, protocol)
    report["score"] = score
    report["baselines"] = {b: _metrics_for(b, test, val, num_classes, tpr, protocol) for b in baselines if b in test}
    return report


def per_unknown_class_auroc(test: dict, score: str, orig: np.ndarray, names: list[str]) -> dict[str, float]:
    """AUROC of all known test samples against each unknown original class on its own.

    `orig` holds the original label of each test sample, aligned with `test`'s arrays.
    """
    known = test["labels"] >= 0
    out = {}
    for cls in np.unique(orig[~known]):
        mask = (~known) & (orig == cls)
        name = names[int(cls)] if int(cls) < len(names) else str(int(cls))
        out[name] = metrics.auroc(test[score][known], test[score][mask])
    return out


def join_known_and_ood(test: dict, ood: dict) -> dict:
    """Known test samples plus one OOD set (labelled -1), for per-OOD-set metrics."""
    known = test["labels"] >= 0
    return {k: np.concatenate([test[k][known], ood[k]]) for k in test if k in ood}


def headline_auroc(summary: dict) -> tuple[float, str]:
    """THE AUROC a run is ranked by, and what it is the AUROC of: the test set's own unknown
    classes when the split has them; otherwise (a split-less run, ImageNet style) the mean over
    the near-OOD sets, else over the far ones; NaN when there is nothing unknown at all."""
    if summary.get("num_test_unknown"):
        return float(summary.get("auroc", float("nan"))), "test set (the split's unknown classes)"
    groups = summary.get("ood_groups") or {}
    for group in ("near", "far"):
        if group in groups:
            sets = groups[group]["sets"]
            return float(groups[group].get("auroc", float("nan"))), f"{group}-OOD mean ({', '.join(sets)})"
    return float("nan"), "nothing (no unknown test class and no OOD set)"


def group_means(per_set: dict[str, dict], groups: dict[str, str]) -> dict[str, dict]:
    """Mean of every numeric metric of the primary score over the OOD sets of each group, near
    first, then far (OpenOOD's order; metrics.md lists them so), then any other group by name."""
    out: dict[str, dict] = {}
    for group in sorted(set(groups.get(name, "far") for name in per_set), key=lambda g: (g != "near", g != "far", g)):
        members = [per_set[name] for name in per_set if groups.get(name, "far") == group]
        keys = [k for k, v in members[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and not k.startswith("num_")]
        out[group] = {k: float(np.mean([m[k] for m in members])) for k in keys}
        out[group]["sets"] = [name for name in per_set if groups.get(name, "far") == group]
    return out
