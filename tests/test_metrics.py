"""Metrics against scikit-learn and against brute-force definitions (ties included)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve

from cssr_dist.errors import DataError
from cssr_dist.eval import metrics as M


def _data(seed: int, n_known: int, n_unknown: int, levels: int | None):
    """Random scores; ``levels`` quantises them so that many ties occur."""
    rng = np.random.default_rng(seed)
    k = rng.normal(0.8, 1.0, n_known)
    u = rng.normal(0.0, 1.0, n_unknown)
    if levels is not None:
        k, u = np.round(k * levels) / levels, np.round(u * levels) / levels
    return k, u


def _brute_oscr(known: np.ndarray, correct: np.ndarray, unknown: np.ndarray) -> float:
    """OSR-literature OSCR, O(N^2): one (FPR, CCR) point per score used as threshold."""
    points = [(0.0, 0.0)]  # threshold above every score
    for t in np.concatenate([known, unknown]):
        ccr = np.sum((known >= t) & correct) / known.size
        fpr = np.sum(unknown >= t) / unknown.size
        points.append((fpr, ccr))
    points.sort()
    area = 0.0
    for (f0, c0), (f1, c1) in zip(points[:-1], points[1:]):
        area += (f1 - f0) * (c0 + c1) / 2.0
    return area


CASES = [(0, 300, 200, None), (1, 300, 200, 4), (2, 50, 400, 1), (3, 500, 37, 10), (4, 7, 3, None)]


@pytest.mark.parametrize("seed,nk,nu,levels", CASES)
def test_ranking_metrics_match_sklearn(seed, nk, nu, levels):
    k, u = _data(seed, nk, nu, levels)
    y = np.r_[np.ones(nk), np.zeros(nu)]
    s = np.r_[k, u]
    assert M.auroc(k, u) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.aupr_in(k, u) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.aupr_out(k, u) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    for target in (0.5, 0.9, 0.95, 1.0):
        expected = fpr[np.searchsorted(tpr, target, side="left")]
        assert M.fpr_at_tpr(k, u, target) == pytest.approx(expected, abs=1e-12)


def test_fpr95_convention_is_known_positive():
    known = np.arange(100, dtype=float)  # 95% of known accepted at threshold 5
    unknown = np.array([4.0, 5.0, 6.0, 50.0])  # 3 of 4 unknown have score >= 5
    assert M.fpr_at_tpr(known, unknown) == pytest.approx(0.75)
    assert M.compute_metrics(np.r_[known, unknown], np.zeros(104, int), np.r_[np.zeros(100, int), -np.ones(4, int)], 1)[
        "fpr95"
    ] == pytest.approx(0.75)


def test_auroc_extremes_and_ties():
    assert M.auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert M.auroc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert M.auroc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5


@pytest.mark.parametrize("seed,nk,nu,levels", CASES + [(5, 200, 200, 2)])
def test_oscr_equals_brute_force(seed, nk, nu, levels):
    k, u = _data(seed, nk, nu, levels)
    correct = np.random.default_rng(seed + 100).random(nk) < 0.8
    assert M.oscr(k, correct, u) == pytest.approx(_brute_oscr(k, correct, u), abs=1e-9)


def test_oscr_ties_move_together_and_known_values():
    # all scores tied: one threshold, curve (0,0) -> (1, acc): area = acc / 2, whatever the order
    correct = np.array([True, False, True, True])
    assert M.oscr(np.ones(4), correct, np.ones(3)) == pytest.approx(0.375)
    assert M.oscr(np.ones(4), correct[::-1], np.ones(3)) == pytest.approx(0.375)
    # perfect separation and all correct: OSCR = 1; with accuracy a: OSCR = a
    assert M.oscr([2.0, 3.0], [True, True], [0.0, 1.0]) == pytest.approx(1.0)
    assert M.oscr([2.0, 3.0], [True, False], [0.0, 1.0]) == pytest.approx(0.5)


def test_oscr_all_correct_equals_auroc():
    k, u = _data(7, 200, 150, 3)
    assert M.oscr(k, np.ones(k.size, bool), u) == pytest.approx(M.auroc(k, u), abs=1e-12)


@pytest.mark.parametrize(
    "fn",
    [M.auroc, M.aupr_in, M.aupr_out, M.fpr_at_tpr, lambda k, u: M.oscr(k, np.ones(len(k), bool), u)],
)
def test_degenerate_inputs_give_nan(fn):
    assert math.isnan(fn(np.array([]), np.array([1.0, 2.0])))
    assert math.isnan(fn(np.array([1.0, 2.0]), np.array([])))
    assert math.isnan(fn(np.array([1.0, np.nan]), np.array([0.0])))


def test_closed_set_accuracy_ignores_unknown():
    preds = np.array([0, 1, 2, 2, 0])
    labels = np.array([0, 1, 1, -1, -1])
    assert M.closed_set_accuracy(preds, labels) == pytest.approx(2 / 3)
    assert math.isnan(M.closed_set_accuracy(preds[3:], labels[3:]))


def test_threshold_at_tpr_accepts_the_requested_fraction():
    s = np.random.default_rng(0).permutation(np.arange(100, dtype=float))
    thr = M.threshold_at_tpr(s, 0.95)
    assert thr == 5.0 and np.mean(s >= thr) == pytest.approx(0.95)
    assert M.threshold_at_tpr(s, 1.0) == 0.0
    assert M.threshold_at_tpr([3.0], 0.95) == 3.0
    for n in (7, 33, 101):
        v = np.random.default_rng(n).normal(size=n)
        t = M.threshold_at_tpr(v, 0.95)
        assert np.mean(v >= t) >= 0.95 and np.mean(v > t) < 0.95  # largest such threshold
    assert math.isnan(M.threshold_at_tpr(np.array([])))


def test_open_set_macro_f1_matches_sklearn():
    rng = np.random.default_rng(3)
    k, n = 4, 400
    labels = rng.integers(-1, k, n)
    preds = np.where(rng.random(n) < 0.7, np.maximum(labels, 0), rng.integers(0, k, n))
    scores = rng.normal(size=n) + (labels >= 0)
    thr = 0.3
    y_true = np.where(labels < 0, k, labels)
    y_pred = np.where(scores < thr, k, preds)
    expected = f1_score(y_true, y_pred, average="macro")
    assert M.open_set_macro_f1(preds, labels, scores, thr, k) == pytest.approx(expected, abs=1e-12)
    # a known class absent from truth and prediction is excluded, as sklearn does
    mask = (labels != 2) & (preds != 2)
    y_t, y_p = y_true[mask], y_pred[mask]
    assert M.open_set_macro_f1(preds[mask], labels[mask], scores[mask], thr, k) == pytest.approx(
        f1_score(y_t, y_p, average="macro"), abs=1e-12
    )
    assert math.isnan(M.open_set_macro_f1(preds, labels, scores, float("nan"), k))


def test_per_class_auroc():
    rng = np.random.default_rng(4)
    labels = np.r_[rng.integers(0, 3, 60), -np.ones(40, int)]
    orig = np.r_[rng.integers(0, 3, 60), np.repeat([5, 7], 20)]
    scores = rng.normal(size=100)
    scores[60:80] -= 2.0  # original class 5 is easy
    res = M.per_class_auroc(scores, labels, orig)
    assert list(res) == [5, 7]
    for c in (5, 7):
        sel = (labels >= 0) | (orig == c)
        assert res[c] == pytest.approx(roc_auc_score(labels[sel] >= 0, scores[sel]), abs=1e-12)
    assert res[5] > res[7]


def test_compute_metrics_keys_values_and_errors():
    rng = np.random.default_rng(5)
    labels = np.r_[rng.integers(0, 5, 300), -np.ones(200, int)]
    preds = np.where(rng.random(500) < 0.9, np.maximum(labels, 0), 1)
    scores = rng.normal(size=500) + 1.5 * (labels >= 0)
    thr = M.threshold_at_tpr(rng.normal(size=100) + 1.5)
    out = M.compute_metrics(scores, preds, labels, 5, thr)
    assert tuple(out) == M.METRIC_KEYS
    assert all(type(v) is float for v in out.values())
    known = labels >= 0
    assert out["auroc"] == pytest.approx(roc_auc_score(known, scores), abs=1e-12)
    assert out["aupr_out"] == pytest.approx(average_precision_score(~known, -scores), abs=1e-12)
    assert out["oscr"] == pytest.approx(M.oscr(scores[known], preds[known] == labels[known], scores[~known]))
    assert out["macro_f1"] == pytest.approx(M.open_set_macro_f1(preds, labels, scores, thr, 5))
    assert out["closed_acc"] == pytest.approx(np.mean(preds[known] == labels[known]))
    no_unknown = M.compute_metrics(scores[:300], preds[:300], labels[:300], 5, None)
    assert no_unknown["closed_acc"] == out["closed_acc"]
    assert all(math.isnan(no_unknown[k]) for k in ("auroc", "aupr_in", "aupr_out", "fpr95", "oscr", "macro_f1"))
    with pytest.raises(DataError, match="num_classes"):
        M.compute_metrics(scores, preds, np.where(labels == 4, 9, labels), 5)
    with pytest.raises(ValueError, match="shapes differ"):
        M.compute_metrics(scores[:10], preds, labels, 5)


def test_metrics_module_does_not_import_torch_distributed():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(M))
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("torch" in (x or "") for x in names | modules)


# ------------------------------------------------- reference vs clean definitions (issue 11)
# Hand-computed example: known [4, 3, 2, 1], unknown [3.5, 0.5]. Descending: K U K K K U.
HAND_K, HAND_U = np.array([4.0, 3.0, 2.0, 1.0]), np.array([3.5, 0.5])


def test_aupr_trapezoid_and_average_precision_by_hand():
    # PR points (recall, precision): (.25, 1) (.25, .5) (.5, 2/3) (.75, .75) (1, .8) (1, 2/3)
    assert M.aupr_in(HAND_K, HAND_U) == pytest.approx(193 / 240)  # sum dR * P
    assert M.aupr_in_trapz(HAND_K, HAND_U) == pytest.approx(23 / 30)  # trapezoid from (0, 1)
    # unknown positive: (.5, 1) (.5, .5) (.5, 1/3) (.5, .25) (1, .4) (1, 1/3)
    assert M.aupr_out(HAND_K, HAND_U) == pytest.approx(0.7)
    assert M.aupr_out_trapz(HAND_K, HAND_U) == pytest.approx(0.5 + 0.5 * (0.25 + 0.4) / 2)


def test_fpr95_closest_point_versus_first_threshold_by_hand():
    # 100 known: 94 at 10, 3 at 5, 3 at 1; 4 unknown: 7, 0, 0, 0.
    # ROC (tpr, fpr): (.94, 0) (.94, .25) (.97, .25) (1, .25) (1, 1)
    known = np.r_[np.full(94, 10.0), np.full(3, 5.0), np.full(3, 1.0)]
    unknown = np.array([7.0, 0.0, 0.0, 0.0])
    assert M.fpr_at_tpr(known, unknown) == pytest.approx(0.25)  # first TPR >= .95 is .97
    assert M.fpr95_known_pos_closest(known, unknown) == 0.0  # TPR .94 is closest (below .95)
    # OOD positive: flag scores <= t as unknown; 95% of unknown flagged first at t = 7 where
    # 6 of 100 known (the 5s and 1s) are flagged too
    assert M.fpr_at_tpr_ood_pos(known, unknown) == pytest.approx(0.06)
    labels = np.r_[np.zeros(100, int), -np.ones(4, int)]
    s = np.r_[known, unknown]
    clean = M.protocol_metrics(s, np.zeros(104, int), labels, 1, "clean")
    ref = M.protocol_metrics(s, np.zeros(104, int), labels, 1, "reference")
    assert clean["fpr95_known_pos"] == pytest.approx(0.25) and clean["fpr95_ood_pos"] == pytest.approx(0.06)
    assert ref["fpr95_known_pos_closest"] == 0.0


@pytest.mark.parametrize("seed,nk,nu,levels", CASES + [(6, 40, 60, 2), (7, 333, 91, 3)])
def test_reference_definitions_match_the_reference_sklearn_calls(seed, nk, nu, levels):
    """The reference: auc(recall, precision) of precision_recall_curve; argmin |tpr - .95| of roc_curve."""
    from sklearn.metrics import auc, precision_recall_curve

    k, u = _data(seed, nk, nu, levels)
    y = np.r_[np.ones(nk, bool), np.zeros(nu, bool)]
    s = np.r_[k, u]
    p, r, _ = precision_recall_curve(y, s)
    assert M.aupr_in_trapz(k, u) == pytest.approx(auc(r, p), abs=1e-12)
    p, r, _ = precision_recall_curve(~y, -s)
    assert M.aupr_out_trapz(k, u) == pytest.approx(auc(r, p), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s)  # default drop_intermediate=True, as the reference
    assert M.fpr95_known_pos_closest(k, u) == pytest.approx(fpr[np.abs(tpr - 0.95).argmin()], abs=1e-12)
    fpr, tpr, _ = roc_curve(~y, -s, drop_intermediate=False)  # OpenOOD: OOD positive
    assert M.fpr_at_tpr_ood_pos(k, u) == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)


def test_protocol_metrics_keys_and_not_reported():
    rng = np.random.default_rng(8)
    labels = np.r_[rng.integers(0, 3, 90), -np.ones(30, int)]
    preds = np.maximum(labels, 0)
    scores = rng.normal(size=120) + (labels >= 0)
    clean = M.protocol_metrics(scores, preds, labels, 3, "clean", threshold=0.0)
    assert tuple(clean) == M.CLEAN_METRIC_KEYS
    old = M.compute_metrics(scores, preds, labels, 3, 0.0)
    for key in ("closed_acc", "auroc", "aupr_in", "aupr_out", "oscr", "macro_f1"):
        assert clean[key] == pytest.approx(old[key])
    assert clean["fpr95_known_pos"] == pytest.approx(old["fpr95"])
    ref = M.protocol_metrics(scores, preds, labels, 3, "reference", threshold=0.0)
    assert tuple(ref) == M.REFERENCE_METRIC_KEYS and "macro_f1" not in ref
    assert "without test data" in M.NOT_REPORTED["reference"]["macro_f1"]
    both = M.protocol_metrics(scores, preds, labels, 3, "reference", side_by_side=True)
    assert set(both) == set(M.CLEAN_METRIC_KEYS) | set(M.REFERENCE_METRIC_KEYS)
    assert both["aupr_in_trapz"] == pytest.approx(ref["aupr_in_trapz"]) and math.isnan(both["macro_f1"])
    assert all(math.isnan(v) for k, v in M.protocol_metrics(scores[:90], preds[:90], labels[:90], 3,
                                                            "reference").items() if k != "closed_acc")
    with pytest.raises(ValueError, match="protocol"):
        M.protocol_metrics(scores, preds, labels, 3, "paper")


# ------------------------------------------------- the reference code's OSCR (issue 16)
def _reference_oscr_loop(known: np.ndarray, correct: np.ndarray, unknown: np.ndarray) -> float:
    """The CSSR reference code's compute_oscr, transcribed: every score a threshold with a
    STRICT '>', points (0, 0) first and (1, 1) last, sorted by value, trapezoid rule."""
    scores = np.r_[known, unknown]
    ccr_pts, fpr_pts = [0.0], [0.0]
    for s in -np.sort(-scores):
        ccr_pts.append(((known > s) & correct).sum() / known.size)
        fpr_pts.append((unknown > s).sum() / unknown.size)
    ccr_pts.append(1.0)
    fpr_pts.append(1.0)
    roc = sorted(zip(fpr_pts, ccr_pts), reverse=True)
    area = 0.0
    for j in range(len(ccr_pts) - 1):
        area += (roc[j][0] - roc[j + 1][0]) * (roc[j][1] + roc[j + 1][1]) / 2.0
    return area


@pytest.mark.parametrize("seed,nk,nu,levels", CASES + [(8, 120, 80, 1), (9, 60, 300, 2)])
def test_oscr_to_1_equals_the_reference_loop_and_the_tie_formula(seed, nk, nu, levels):
    k, u = _data(seed, nk, nu, levels)
    correct = np.random.default_rng(seed + 200).random(nk) < 0.7
    if levels is not None:  # force ties at the lowest score, unknowns among them
        low = min(k.min(), u.min())
        u[: max(1, nu // 5)] = low
    expected = _reference_oscr_loop(k, correct, u)
    assert M.oscr_to_1(k, correct, u) == pytest.approx(expected, abs=1e-12)
    # the difference to the clean OSCR is f x (1 - acc) / 2, f = unknowns at the lowest score
    lowest = min(k.min(), u.min())
    f, acc = np.mean(u == lowest), correct.mean()
    assert M.oscr_to_1(k, correct, u) - M.oscr(k, correct, u) == pytest.approx(f * (1 - acc) / 2, abs=1e-12)


def test_oscr_to_1_all_tied_and_reported_under_reference():
    correct = np.array([True, False, True, True, True])  # accuracy 0.8
    assert M.oscr(np.ones(5), correct, np.ones(3)) == pytest.approx(0.4)
    assert M.oscr_to_1(np.ones(5), correct, np.ones(3)) == pytest.approx(0.5)  # 0.10 apart
    assert M.oscr_to_1(np.ones(5), correct, np.ones(3)) == pytest.approx(_reference_oscr_loop(np.ones(5), correct,
                                                                                              np.ones(3)))
    # a known sample alone at the lowest score: the two definitions agree
    k, u = np.array([0.0, 2.0, 3.0]), np.array([1.0, 2.5])
    assert M.oscr_to_1(k, np.ones(3, bool), u) == pytest.approx(M.oscr(k, np.ones(3, bool), u))
    labels = np.r_[np.zeros(5, int), -np.ones(3, int)]
    preds = np.r_[np.where(correct, 0, 1), np.zeros(3, int)]
    scores = np.ones(8)
    ref = M.protocol_metrics(scores, preds, labels, 2, "reference")
    clean = M.protocol_metrics(scores, preds, labels, 2, "clean")
    assert ref["oscr_to_1"] == pytest.approx(0.5) and "oscr" not in ref
    assert clean["oscr"] == pytest.approx(0.4) and "oscr_to_1" not in clean
    assert math.isnan(M.oscr_to_1(np.array([]), np.array([], bool), np.ones(2)))
