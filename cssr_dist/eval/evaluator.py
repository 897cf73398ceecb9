"""Evaluation loop: score statistics on training data, per-sample scores, metrics per set.

Statistics (prototypes, Gram means, z-normalisation) are fitted on known TRAINING images
with test transforms (the reference used augmented images), summed across ranks, and kept
in the model state. Thresholds for macro-F1 come from the validation slice, never the
test set. Every score is reported with the same metrics so baselines sit beside CSSR.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from ..engine.distributed import concat_local, gather_by_id
from ..scoring.scores import compute_scores, predict as predict_classes
from ..scoring.statistics import ScoreStatistics
from . import metrics as M



def primary_score(head: str, method: str, requested: str) -> str:
    """'auto': integrated S0+S1+S2 for CSSR from scratch, S0 for fine-tuning, MSP for linear."""
    if requested != "auto":
        return requested
    if head == "linear":
        return "msp"
    return "s0" if method == "cssr_ft" else "integrated"


def needs_statistics(score: str) -> bool:
    return score in ("s1", "s2", "integrated")


def _batches(loader: Iterable, progress: Callable[[Iterable], Iterable] | None):
    return progress(loader) if progress else loader


@torch.no_grad()
def fit_statistics(model, loader, stats: ScoreStatistics, head: str, accelerator, progress=None) -> None:
    """Two passes: class statistics (prototypes, Gram), then moments of S0/S1/S2 for z-norm."""
    model.eval()
    stats.reset_()
    reduce = lambda t: accelerator.reduce(t, reduction="sum")  # noqa: E731
    for images, _, _ in _batches(loader, progress):
        with accelerator.autocast():
            out = model(images.to(accelerator.device))
        feats, logits = out.features.float(), out.logits.float()
        stats.update_class_stats(feats, predict_classes(head, logits))
    stats.reduce_(reduce, "class")
    for images, _, _ in _batches(loader, progress):
        with accelerator.autocast():
            out = model(images.to(accelerator.device))
        scores = compute_scores(head, out.features.float(), out.logits.float(), stats)
        stats.update_moments({k: scores[k] for k in stats.score_names})
    stats.reduce_(reduce, "moments")


@torch.no_grad()
def predict(model, loader, stats: ScoreStatistics | None, head: str, accelerator, progress=None) -> dict[str, np.ndarray]:
    """Per-sample labels, ids, prediction and every score, gathered from all ranks by id."""
    model.eval()
    chunks: list[dict[str, torch.Tensor]] = []
    for images, labels, ids in _batches(loader, progress):
        with accelerator.autocast():
            out = model(images.to(accelerator.device))
        scores = compute_scores(head, out.features.float(), out.logits.float(), stats)
        row = {k: v.detach() for k, v in scores.items()}  # float64 scores: S2 reaches 1e10
        row["labels"] = labels.to(accelerator.device)
        row["ids"] = ids.to(accelerator.device)
        chunks.append(row)
    return gather_by_id(concat_local(chunks), accelerator.num_processes)


def _metrics_for(score: str, test: dict, val: dict, num_classes: int, tpr: float) -> dict:
    threshold = M.threshold_at_tpr(val[score], tpr) if val and len(val.get(score, [])) else float("nan")
    out = M.compute_metrics(test[score], test["pred"], test["labels"], num_classes, threshold)
    out["threshold"] = threshold
    return out


def score_report(test: dict, val: dict, score: str, baselines: list[str], num_classes: int, tpr: float) -> dict:
    """Metrics of the primary score plus a `baselines` object with the same keys per baseline."""
    report = _metrics_for(score, test, val, num_classes, tpr)
    report["score"] = score
    report["baselines"] = {b: _metrics_for(b, test, val, num_classes, tpr) for b in baselines if b in test}
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
        out[name] = M.auroc(test[score][known], test[score][mask])
    return out


def join_known_and_ood(test: dict, ood: dict) -> dict:
    """Known test samples plus one OOD set (labelled -1), for per-OOD-set metrics."""
    known = test["labels"] >= 0
    return {k: np.concatenate([test[k][known], ood[k]]) for k in test if k in ood}
