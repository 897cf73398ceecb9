"""Evaluation plots (ROC curve, known-vs-unknown score histogram) and the per-unknown-class
AUROC table, as matplotlib figures for W&B and as PNG / CSV files in the run folder.

A number such as AUROC 0.78 hides whether the unknowns overlap the knowns everywhere or
only in a tail; the histogram shows it, and the per-class table shows which unknown class
is hard. The same pictures go to W&B (``tracking.log_evaluation``) and to
``<run>/plots/`` (:func:`write_evaluation_plots`) for people without W&B.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never pyplot: no
global figure state, no display needed, safe on a cluster node.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import metrics

__all__ = ["roc_figure", "histogram_figure", "can_draw_roc", "can_draw_histogram", "per_class_rows",
           "write_evaluation_plots", "thin_curve"]

#: Most points of an ROC curve sent to W&B or drawn (the curve of 50k samples has ~50k).
MAX_CURVE_POINTS = 1000


def _split(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    known = np.asarray(labels) >= 0
    if s.shape != known.shape:
        raise ValueError(f"scores shape {s.shape} != labels shape {known.shape}")
    return s[known], s[~known]


def thin_curve(x: np.ndarray, y: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of a curve, first and last kept (for plots only)."""
    if x.size <= max_points:
        return x, y
    idx = np.unique(np.r_[np.linspace(0, x.size - 1, max_points).round().astype(int), x.size - 1])
    return x[idx], y[idx]


def _figure(width: float = 4.5, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def can_draw_roc(labels: np.ndarray) -> bool:
    """An ROC curve needs known AND unknown samples (a split-less test set has no unknowns)."""
    known = np.asarray(labels) >= 0
    return bool(known.any() and (~known).any())


def can_draw_histogram(scores: np.ndarray) -> bool:
    """A histogram needs one finite score."""
    return bool(np.isfinite(np.asarray(scores, dtype=np.float64)).any())


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    """ROC curves (known positive), one line per score: ``{name: (scores, labels)}``."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, (scores, labels) in curves.items():
        known, unknown = _split(scores, labels)
        fpr, tpr = metrics.roc_points(known, unknown)
        if fpr.size:
            fx, fy = thin_curve(fpr, tpr)
            ax.plot(fx, fy, label=f"{name} (AUROC {metrics.auroc(known, unknown):.3f})", linewidth=1.2)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="FPR (unknown accepted)", ylabel="TPR (known accepted)", xlim=(0, 1), ylim=(0, 1.01), title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def histogram_figure(scores: np.ndarray, labels: np.ndarray, title: str, bins: int = 80) -> Figure:
    """Density histograms of known and unknown scores on one axis (0.25-99.75 percentile range,
    so that a few extreme S2 values do not squeeze every bar into one bin)."""
    known, unknown = _split(scores, labels)
    both = np.r_[known, unknown]
    both = both[np.isfinite(both)]
    fig = _figure(5.0, 3.5)
    ax = fig.add_subplot()
    if both.size:
        lo, hi = np.percentile(both, [0.25, 99.75])
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        for values, name, colour in ((known, "known", "tab:green"), (unknown, "unknown", "tab:red")):
            values = values[np.isfinite(values)]
            if values.size:
                ax.hist(np.clip(values, lo, hi), bins=edges, density=True, alpha=0.45, color=colour,
                        label=f"{name} (n={values.size})")
        ax.legend(fontsize=8)
    ax.set(xlabel="score (higher = more likely known)", ylabel="density", title=title)
    fig.tight_layout()
    return fig


def per_class_rows(per_class_auroc: dict) -> list[tuple[str, float]]:
    """``{unknown class: AUROC}`` -> rows sorted hardest first (lowest AUROC), NaN last."""
    rows = [(str(name), float("nan") if value is None else float(value)) for name, value in per_class_auroc.items()]
    return sorted(rows, key=lambda r: (np.isnan(r[1]), r[1]))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "set"


def write_evaluation_plots(run_dir: str | Path, scores: dict[str, np.ndarray], labels: np.ndarray,
                           prefix: str = "test", per_class_auroc: dict | None = None) -> list[Path]:
    """PNG plots and the per-class table of one evaluation into ``<run_dir>/plots/``.

    Writes ``<prefix>_roc.png`` (every score's ROC curve on one axis; only when the set has
    known and unknown samples), ``<prefix>_hist_<score>.png`` per score with a finite value and,
    when given,
    ``<prefix>_per_unknown_class_auroc.csv``. Files are overwritten, so the folder holds the
    latest evaluation. Returns the paths written. Call on the main process only.
    """
    out = Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    tag = _safe(prefix)
    written = []
    if can_draw_roc(labels):  # no empty plot: without unknowns there is no curve
        roc = out / f"{tag}_roc.png"
        roc_figure({name: (s, labels) for name, s in scores.items()}, f"ROC ({prefix})").savefig(roc)
        written.append(roc)
    for name, s in scores.items():
        if not can_draw_histogram(s):
            continue
        path = out / f"{tag}_hist_{_safe(name)}.png"
        histogram_figure(s, labels, f"{name} ({prefix})").savefig(path)
        written.append(path)
    if per_class_auroc:
        path = out / f"{tag}_per_unknown_class_auroc.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["unknown_class", "auroc"])
            writer.writerows(per_class_rows(per_class_auroc))
        written.append(path)
    return written
