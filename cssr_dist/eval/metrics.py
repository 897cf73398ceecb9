"""Open-set recognition metrics as pure functions on numpy arrays.

Conventions (see docs/architecture.md):

* labels: known classes ``0..K-1``, unknown ``-1``;
* scores: higher = more likely KNOWN;
* KNOWN IS THE POSITIVE CLASS unless a name says otherwise. ``aupr_in`` treats known as
  positive, ``aupr_out`` treats unknown as positive (scores negated), and ``fpr95`` is the
  fraction of UNKNOWN samples accepted at the threshold that accepts 95% of the KNOWN
  samples. This is the CSSR reference's convention; OpenOOD reports "FPR@95" with OOD as
  the positive class, which is a different number. Do not compare the two directly.

Two sets of definitions (docs/method.md §4), both reported under names that say which:

* clean (``compute_metrics``, ``protocol_metrics(..., "clean")``): AUPR is average precision
  (scikit-learn); FPR95 is taken at the first (highest) threshold whose TPR reaches 0.95,
  in both positive conventions: ``fpr95_known_pos`` (CSSR's; equals ``fpr95``) and
  ``fpr95_ood_pos`` (OpenOOD's, OOD = positive);
* reference (``protocol_metrics(..., "reference")``): what the CSSR reference code computes,
  i.e. ``aupr_in_trapz`` / ``aupr_out_trapz`` (trapezoid area under scikit-learn's PR curve,
  which starts at recall 0, precision 1) and ``fpr95_known_pos_closest`` (known positive, the
  point of scikit-learn's default, thinned ROC curve whose TPR is CLOSEST to 0.95, possibly
  below it). Its macro-F1 threshold is tuned on the test set, so the reference protocol
  does not report macro-F1 (:data:`NOT_REPORTED`).

Degenerate input: when a metric needs both known and unknown samples and one group is
empty, or when any score is NaN, the metric is ``float('nan')``; nothing raises. A NaN
result in a table is then visibly "undefined" instead of a crash at the end of a long run.

Every ranking metric sorts the scores once (O(N log N)) and works on cumulative counts at
the DISTINCT score values, so tied scores always move together across a threshold. This is
what makes the numbers equal scikit-learn's (which also collapses ties).

OSCR has two definitions. ``oscr`` (clean) closes its curve at (FPR 1, CCR = closed-set
accuracy): every sample accepted. The reference code's O(N^2) loop (``oscr_to_1``,
reference protocol) takes each score as a threshold with a STRICT ``>``, so no point
accepts every sample, and closes the curve at (1, 1) instead. It sorts its points by
value, so the order of tied samples does not matter; the two differ by exactly
f x (1 - acc) / 2, f being the share of unknowns tied at the lowest score (0 when a known
sample alone holds the lowest score; (1 - acc) / 2 when every score is equal).

This module must not import torch.distributed (evaluation gathers first, then calls these).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from ..errors import DataError

NAN = float("nan")

__all__ = [
    "auroc",
    "aupr_in",
    "aupr_out",
    "fpr_at_tpr",
    "oscr",
    "oscr_to_1",
    "closed_set_accuracy",
    "threshold_at_tpr",
    "open_set_macro_f1",
    "per_class_auroc",
    "compute_metrics",
    "METRIC_KEYS",
    "aupr_in_trapz",
    "aupr_out_trapz",
    "fpr95_known_pos_closest",
    "fpr_at_tpr_ood_pos",
    "protocol_metrics",
    "protocol_metric_keys",
    "roc_points",
    "CLEAN_METRIC_KEYS",
    "REFERENCE_METRIC_KEYS",
    "NOT_REPORTED",
]

#: Keys of :func:`compute_metrics`, in table order.
METRIC_KEYS = ("closed_acc", "auroc", "aupr_in", "aupr_out", "fpr95", "oscr", "macro_f1")

#: Keys of :func:`protocol_metrics` under each protocol, in table order.
CLEAN_METRIC_KEYS = (
    "closed_acc", "auroc", "aupr_in", "aupr_out", "fpr95_known_pos", "fpr95_ood_pos", "oscr", "macro_f1",
)
REFERENCE_METRIC_KEYS = (
    "closed_acc", "auroc", "aupr_in_trapz", "aupr_out_trapz", "fpr95_known_pos_closest", "oscr_to_1",
)

#: Metrics a protocol deliberately leaves out, with the reason (write it into reports).
NOT_REPORTED: dict[str, dict[str, str]] = {
    "clean": {},
    "reference": {
        "macro_f1": "needs a threshold chosen without test data: not reported under the reference protocol",
    },
}


class _Curve(NamedTuple):
    """Cumulative counts at each distinct score, thresholds descending.

    ``tp[i]`` / ``fp[i]``: positives / negatives with score >= the i-th largest distinct
    score. The last entries equal the totals.
    """

    tp: np.ndarray
    fp: np.ndarray
    n_pos: int
    n_neg: int


def _as_1d_float(x: np.ndarray | list, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _has_nan(*arrays: np.ndarray) -> bool:
    return any(np.isnan(a).any() for a in arrays)


def _curve(pos_scores: np.ndarray, neg_scores: np.ndarray) -> _Curve:
    """Sort once; cumulative positive/negative counts at distinct thresholds (descending)."""
    scores = np.concatenate([pos_scores, neg_scores])
    is_pos = np.concatenate([np.ones(pos_scores.size, bool), np.zeros(neg_scores.size, bool)])
    order = np.argsort(-scores)  # order within ties is irrelevant: runs are grouped
    s = scores[order]
    p = is_pos[order]
    # last index of each run of equal scores: a threshold only exists between distinct values
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tp = np.cumsum(p, dtype=np.int64)[ends]
    fp = (ends + 1) - tp
    return _Curve(tp, fp, pos_scores.size, neg_scores.size)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (np.trapezoid is numpy>=2 only; the project supports numpy 1.24)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _auc_from_curve(c: _Curve) -> float:
    tpr = np.r_[0.0, c.tp / c.n_pos]
    fpr = np.r_[0.0, c.fp / c.n_neg]
    return _trapezoid(tpr, fpr)


def _ap_from_curve(c: _Curve) -> float:
    """Average precision as scikit-learn defines it: sum_n (R_n - R_{n-1}) P_n."""
    precision = c.tp / (c.tp + c.fp)
    recall = c.tp / c.n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _binary_ready(pos: np.ndarray, neg: np.ndarray) -> bool:
    return pos.size > 0 and neg.size > 0 and not _has_nan(pos, neg)


def roc_points(known_scores: np.ndarray, unknown_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the full ROC curve, known positive, from (0, 0): one point per distinct
    score, the curve :func:`auroc` integrates (for plots). Empty arrays when undefined."""
    pos = _as_1d_float(known_scores, "known_scores")
    neg = _as_1d_float(unknown_scores, "unknown_scores")
    if not _binary_ready(pos, neg):
        return np.zeros(0), np.zeros(0)
    c = _curve(pos, neg)
    return np.r_[0.0, c.fp / c.n_neg], np.r_[0.0, c.tp / c.n_pos]


def _checked_tpr(tpr: float) -> float:
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    return tpr


def _two_groups(known_scores: np.ndarray, unknown_scores: np.ndarray, area: Callable[["_Curve"], float],
                unknown_positive: bool = False) -> float:
    """`area` of the curve of known vs unknown scores (unknown as positive: scores negated);
    NaN when either group is empty or a score is NaN."""
    pos = _as_1d_float(known_scores, "known_scores")
    neg = _as_1d_float(unknown_scores, "unknown_scores")
    if not _binary_ready(pos, neg):
        return NAN
    return area(_curve(-neg, -pos) if unknown_positive else _curve(pos, neg))


def auroc(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Area under the ROC curve, known = positive (ties count 1/2, as scikit-learn).

    NaN when either group is empty or a score is NaN.
    """
    return _two_groups(known_scores, unknown_scores, _auc_from_curve)


def aupr_in(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Average precision with KNOWN as the positive class (scikit-learn's definition)."""
    return _two_groups(known_scores, unknown_scores, _ap_from_curve)


def aupr_out(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Average precision with UNKNOWN as the positive class: scores are negated."""
    return _two_groups(known_scores, unknown_scores, _ap_from_curve, unknown_positive=True)


def _fpr_at_tpr_from_curve(c: _Curve, tpr: float) -> float:
    # first (highest) threshold whose TPR reaches the target, as OpenOOD/sklearn roc_curve
    idx = int(np.searchsorted(c.tp / c.n_pos, tpr, side="left"))
    idx = min(idx, c.tp.size - 1)
    return float(c.fp[idx] / c.n_neg)


def fpr_at_tpr(known_scores: np.ndarray, unknown_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of UNKNOWN samples accepted at the highest threshold accepting >= tpr of KNOWN.

    Known is the positive class (CSSR convention; OpenOOD's FPR@95 uses OOD as positive).
    Reported by :func:`compute_metrics` as ``fpr95``. Lower is better.
    """
    _checked_tpr(tpr)
    return _two_groups(known_scores, unknown_scores, lambda c: _fpr_at_tpr_from_curve(c, tpr))


def _oscr_curve(known_scores: np.ndarray, known_correct: np.ndarray,
                unknown_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, CCR) at (0, 0) and at each distinct score (>= threshold, descending); None when
    undefined (a group empty or a score NaN). O(N log N): one sort, cumulative sums."""
    pos = _as_1d_float(known_scores, "known_scores")
    neg = _as_1d_float(unknown_scores, "unknown_scores")
    correct = np.asarray(known_correct, dtype=bool)
    if correct.shape != pos.shape:
        raise ValueError(f"known_correct shape {correct.shape} != known_scores shape {pos.shape}")
    if not _binary_ready(pos, neg):
        return None
    # "positives" = known AND correct; known-but-wrong samples count in neither numerator.
    scores = np.concatenate([pos, neg])
    cc_w = np.concatenate([correct, np.zeros(neg.size, bool)])
    fp_w = np.concatenate([np.zeros(pos.size, bool), np.ones(neg.size, bool)])
    order = np.argsort(-scores)  # order within ties is irrelevant: runs are grouped
    s = scores[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    ccr = np.r_[0.0, np.cumsum(cc_w[order], dtype=np.int64)[ends] / pos.size]
    fpr = np.r_[0.0, np.cumsum(fp_w[order], dtype=np.int64)[ends] / neg.size]
    return fpr, ccr


def oscr(known_scores: np.ndarray, known_correct: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Open-Set Classification Rate: area under CCR(t) versus FPR(t) (Dhamija et al. 2018).

    For a threshold t, CCR(t) = #{known, correctly classified, score >= t} / #known and
    FPR(t) = #{unknown, score >= t} / #unknown. The curve has one point per distinct score
    plus (0, 0) (threshold above every score); the area is the trapezoid rule over it.
    It ends at (1, closed-set accuracy). NaN when either group is empty or a score is NaN.
    """
    curve = _oscr_curve(known_scores, known_correct, unknown_scores)
    return NAN if curve is None else _trapezoid(curve[1], curve[0])


def oscr_to_1(known_scores: np.ndarray, known_correct: np.ndarray, unknown_scores: np.ndarray) -> float:
    """OSCR as the CSSR reference code computes it (the reference protocol's ``oscr_to_1``).

    Its loop thresholds at every score with a strict ``>``: its points are (0, 0), the
    points of :func:`oscr` except the last (the lowest score accepts nothing more), and a
    closing (1, 1) where :func:`oscr` ends at (1, accuracy). So it equals :func:`oscr` plus
    f x (1 - acc) / 2, f = share of unknowns at the lowest score. O(N log N).
    """
    curve = _oscr_curve(known_scores, known_correct, unknown_scores)
    if curve is None:
        return NAN
    fpr, ccr = curve
    ccr = ccr.copy()
    ccr[-1] = 1.0  # fpr[-1] is 1: every unknown has a score >= the lowest
    return _trapezoid(ccr, fpr)


def _pr_trapezoid_from_curve(c: _Curve) -> float:
    """Trapezoid area under scikit-learn's precision-recall curve (the reference's AUPR).

    The curve is one (recall, precision) point per distinct threshold plus (0, 1). Points
    after full recall add no area (zero width), so scikit-learn versions that drop them or
    not give the same number. Differs from average precision by the linear interpolation.
    """
    recall = np.r_[0.0, c.tp / c.n_pos]
    precision = np.r_[1.0, c.tp / (c.tp + c.fp)]
    return _trapezoid(precision, recall)


def aupr_in_trapz(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """AUPR with KNOWN positive as the CSSR reference (and OpenOOD) compute it: trapezoid area."""
    return _two_groups(known_scores, unknown_scores, _pr_trapezoid_from_curve)


def aupr_out_trapz(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """AUPR with UNKNOWN positive (scores negated), reference definition: trapezoid area."""
    return _two_groups(known_scores, unknown_scores, _pr_trapezoid_from_curve, unknown_positive=True)


def _fpr_closest_from_curve(c: _Curve, tpr: float) -> float:
    """The reference's rule on scikit-learn's default ROC curve (``drop_intermediate=True``).

    scikit-learn thins the curve (drops a point when its neighbours' second differences are
    both zero) and prepends (0, 0); ``argmin |TPR - tpr|`` then takes the first closest
    point. Reproducing the thinning matters: with collinear points the closest surviving
    point can be a different one.
    """
    fp, tp = c.fp, c.tp
    if fp.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fp, 2), np.diff(tp, 2)), True])
        fp, tp = fp[keep], tp[keep]
    tprs = np.r_[0.0, tp] / c.n_pos
    fprs = np.r_[0.0, fp] / c.n_neg
    return float(fprs[int(np.argmin(np.abs(tprs - tpr)))])


def fpr95_known_pos_closest(known_scores: np.ndarray, unknown_scores: np.ndarray, tpr: float = 0.95) -> float:
    """FPR of UNKNOWN samples at the ROC point whose TPR (of KNOWN) is closest to ``tpr``.

    The CSSR reference's FPR@TPR95: the TPR may be below the target. Lower is better.
    """
    _checked_tpr(tpr)
    return _two_groups(known_scores, unknown_scores, lambda c: _fpr_closest_from_curve(c, tpr))


def fpr_at_tpr_ood_pos(known_scores: np.ndarray, unknown_scores: np.ndarray, tpr: float = 0.95) -> float:
    """OpenOOD's convention: UNKNOWN is positive. Fraction of KNOWN samples flagged unknown
    at the highest "unknown" threshold that flags >= ``tpr`` of the UNKNOWN samples.

    Same threshold rule as :func:`fpr_at_tpr` (first point reaching the TPR on the full ROC
    curve); OpenOOD applies it to scikit-learn's thinned curve, which can only differ when
    three consecutive ROC points are collinear. Lower is better.
    """
    _checked_tpr(tpr)
    return _two_groups(known_scores, unknown_scores, lambda c: _fpr_at_tpr_from_curve(c, tpr),
                       unknown_positive=True)


def closed_set_accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy on KNOWN samples only (labels >= 0). NaN when there is none."""
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"preds shape {preds.shape} != labels shape {labels.shape}")
    known = labels >= 0
    if not known.any():
        return NAN
    return float(np.mean(preds[known] == labels[known]))


def threshold_at_tpr(val_known_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Score threshold that accepts (score >= threshold) at least ``tpr`` of ``val_known_scores``.

    Pass scores of a held-out VALIDATION slice of the known training classes, never test
    scores: the CSSR reference tunes this threshold on the test set (defect 5 in
    docs/method.md), which leaks test labels into macro-F1. Returns the largest such
    threshold, i.e. the ceil(tpr * n)-th largest score. NaN for empty or NaN input.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    s = _as_1d_float(val_known_scores, "val_known_scores")
    if s.size == 0 or _has_nan(s):
        return NAN
    k = max(1, math.ceil(tpr * s.size - 1e-9))  # tolerance: 0.95 * 100 is 95.00000000000001
    return float(np.sort(s)[s.size - k])


def open_set_macro_f1(
    preds: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    num_classes: int,
) -> float:
    """Macro-F1 over K known classes plus one "unknown" class (index K).

    A sample is predicted unknown when ``score < threshold``, otherwise its closed-set
    prediction stands; true unknowns (label -1) belong to class K. The average runs over
    the classes that occur in the truth or the prediction (a class absent from both has an
    undefined F1), which is scikit-learn's ``f1_score(average="macro")``. Choose the
    threshold with :func:`threshold_at_tpr` on validation data. NaN for a NaN threshold or
    empty input.
    """
    preds = np.asarray(preds).astype(np.int64)
    labels = np.asarray(labels).astype(np.int64)
    s = _as_1d_float(scores, "scores")
    if not (preds.shape == labels.shape == s.shape):
        raise ValueError(f"shapes differ: preds {preds.shape}, labels {labels.shape}, scores {s.shape}")
    if threshold is None or math.isnan(threshold) or s.size == 0 or _has_nan(s):
        return NAN
    k = int(num_classes)
    _check_labels(labels, k)
    if preds.size and (preds.min() < 0 or preds.max() >= k):
        raise ValueError(f"predictions must be in [0, {k}), got range [{preds.min()}, {preds.max()}]")
    y_pred = np.where(s < threshold, k, preds)
    y_true = np.where(labels < 0, k, labels)
    tp = np.bincount(y_true[y_true == y_pred], minlength=k + 1)
    n_pred = np.bincount(y_pred, minlength=k + 1)
    n_true = np.bincount(y_true, minlength=k + 1)
    present = (n_pred + n_true) > 0
    f1 = 2.0 * tp[present] / (n_pred[present] + n_true[present])
    return float(np.mean(f1))


def per_class_auroc(
    scores: np.ndarray, labels: np.ndarray, original_labels: np.ndarray
) -> dict[int, float]:
    """AUROC of ALL known samples versus each unknown ORIGINAL class separately.

    ``labels`` are open-set labels (-1 = unknown); ``original_labels`` are the source data
    set's class indices of the same samples. Returns ``{original_class: auroc}`` for every
    original class that occurs among the unknown samples, sorted by class. Shows which
    unknown classes are hard (e.g. "cat" when "dog" is known). One sort per class.
    """
    s = _as_1d_float(scores, "scores")
    labels = np.asarray(labels)
    orig = np.asarray(original_labels)
    if not (s.shape == labels.shape == orig.shape):
        raise ValueError(f"shapes differ: scores {s.shape}, labels {labels.shape}, original_labels {orig.shape}")
    known = labels >= 0
    unknown_orig = orig[~known]
    unknown_scores = s[~known]
    return {int(c): auroc(s[known], unknown_scores[unknown_orig == c]) for c in np.unique(unknown_orig)}


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        raise DataError(
            f"labels must be -1 (unknown) or in [0, {num_classes}) but range over "
            f"[{labels.min()}, {labels.max()}]; check that the split's known classes match num_classes"
        )


def compute_metrics(
    scores: np.ndarray,
    preds: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    threshold: float | None = None,
) -> dict[str, float]:
    """All summary metrics for one evaluation set (known test samples + one unknown set).

    ``scores``/``preds``/``labels`` are per sample (labels -1 = unknown). ``threshold`` is
    the validation threshold for macro-F1 (:func:`threshold_at_tpr`); ``None`` -> NaN
    macro-F1. Keys: :data:`METRIC_KEYS`, values are Python floats (NaN where undefined).
    The clean protocol's :func:`protocol_metrics` under the older key `fpr95` (= `fpr95_known_pos`).
    """
    out = protocol_metrics(scores, preds, labels, num_classes, "clean",
                           None if threshold is None or threshold != threshold else threshold)
    out["fpr95"] = out.pop("fpr95_known_pos")
    return {key: out[key] for key in METRIC_KEYS}


def protocol_metric_keys(protocol: str, side_by_side: bool = False) -> tuple[str, ...]:
    """Keys of :func:`protocol_metrics` for ``protocol`` (clean | reference), in table order."""
    if protocol not in ("clean", "reference"):
        raise ValueError(f"protocol must be 'clean' or 'reference', got {protocol!r}")
    first = CLEAN_METRIC_KEYS if protocol == "clean" else REFERENCE_METRIC_KEYS
    if not side_by_side:
        return first
    other = REFERENCE_METRIC_KEYS if protocol == "clean" else CLEAN_METRIC_KEYS
    return first + tuple(k for k in other if k not in first)


def protocol_metrics(
    scores: np.ndarray,
    preds: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    protocol: str = "clean",
    threshold: float | None = None,
    side_by_side: bool = False,
) -> dict[str, float]:
    """Summary metrics of one evaluation set under a protocol's definitions.

    ``protocol="clean"``: :data:`CLEAN_METRIC_KEYS` (average precision, first threshold
    reaching TPR 0.95, both positive conventions, macro-F1 at the validation ``threshold``).
    ``protocol="reference"``: :data:`REFERENCE_METRIC_KEYS` (the reference code's
    definitions); macro-F1 is absent, see :data:`NOT_REPORTED`. ``side_by_side=True`` adds
    the other protocol's differently named definitions (macro-F1 only with a threshold
    under reference). Keys never clash across definitions, so the two can share a table.
    """
    keys = protocol_metric_keys(protocol, side_by_side)
    s = _as_1d_float(scores, "scores")
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    if not (s.shape == preds.shape == labels.shape):
        raise ValueError(f"shapes differ: scores {s.shape}, preds {preds.shape}, labels {labels.shape}")
    _check_labels(labels, int(num_classes))
    known = labels >= 0
    pos, neg = s[known], s[~known]
    values = dict.fromkeys(CLEAN_METRIC_KEYS + REFERENCE_METRIC_KEYS, NAN)
    values["closed_acc"] = closed_set_accuracy(preds, labels)
    if _binary_ready(pos, neg):
        c = _curve(pos, neg)
        c_out = _curve(-neg, -pos)
        values.update(
            auroc=_auc_from_curve(c),
            aupr_in=_ap_from_curve(c),
            aupr_out=_ap_from_curve(c_out),
            fpr95_known_pos=_fpr_at_tpr_from_curve(c, 0.95),
            fpr95_ood_pos=_fpr_at_tpr_from_curve(c_out, 0.95),
            oscr=oscr(pos, preds[known] == labels[known], neg),
            oscr_to_1=oscr_to_1(pos, preds[known] == labels[known], neg),
            aupr_in_trapz=_pr_trapezoid_from_curve(c),
            aupr_out_trapz=_pr_trapezoid_from_curve(c_out),
            fpr95_known_pos_closest=_fpr_closest_from_curve(c, 0.95),
        )
    if threshold is not None and "macro_f1" in keys:
        values["macro_f1"] = open_set_macro_f1(preds, labels, s, threshold, num_classes)
    return {k: values[k] for k in keys}
