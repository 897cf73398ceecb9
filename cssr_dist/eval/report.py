"""Markdown tables of a summary: the primary score, its baselines, per-set and per-class AUROC."""

from __future__ import annotations

METRIC_KEYS = ("closed_acc", "auroc", "aupr_in", "aupr_out", "fpr95", "oscr", "macro_f1")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and value == value else "n/a"


def _rows(report: dict, label: str) -> list[str]:
    rows = [f"| {label} | {report.get('score', '')} | " + " | ".join(_fmt(report.get(k)) for k in METRIC_KEYS) + " |"]
    for name, base in (report.get("baselines") or {}).items():
        rows.append(f"| {label} | {name} | " + " | ".join(_fmt(base.get(k)) for k in METRIC_KEYS) + " |")
    return rows


def metrics_table(summary: dict, run_name: str) -> str:
    """The run's metrics as Markdown: one row per (evaluation set, score).

    fpr95 is the false-positive rate on unknowns at 95% TPR with KNOWN as positive
    (the CSSR reference convention; OpenOOD counts OOD as positive).
    """
    head = "| set | score | " + " | ".join(METRIC_KEYS) + " |"
    sep = "|" + "---|" * (len(METRIC_KEYS) + 2)
    lines = [f"## {run_name}", "", head, sep, *_rows(summary, "test")]
    for name, report in (summary.get("ood") or {}).items():
        lines.extend(_rows(report, name))
    per_class = summary.get("per_unknown_class_auroc") or {}
    if per_class:
        lines += ["", f"AUROC per unknown class ({summary.get('score')}):", "",
                  "| unknown class | auroc |", "|---|---|"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in per_class.items()]
    lines += ["", "fpr95: FPR of unknowns at 95% TPR of knowns (known = positive)."]
    return "\n".join(lines) + "\n"
