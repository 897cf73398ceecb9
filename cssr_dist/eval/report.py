"""Markdown tables of a summary: the primary score, its baselines, per-set and per-class AUROC."""

from __future__ import annotations

#: The columns when a summary does not name its own (`metric_keys`, set by the Evaluator per protocol).
METRIC_KEYS = ("closed_acc", "auroc", "aupr_in", "aupr_out", "fpr95_known_pos", "fpr95_ood_pos", "oscr", "macro_f1")
NOTES = {
    "fpr95_known_pos": "fpr95_known_pos: FPR of unknowns at the first threshold with 95% TPR of knowns (known = positive, "
                       "the CSSR reference convention).",
    "fpr95_ood_pos": "fpr95_ood_pos: FPR of knowns at 95% TPR of unknowns (OOD = positive, OpenOOD's convention).",
    "fpr95_known_pos_closest": "fpr95_known_pos_closest: the reference code's FPR95 (ROC point closest to TPR 0.95).",
    "aupr_in_trapz": "aupr_*_trapz: the reference code's AUPR (trapezoid area under the PR curve).",
    "oscr_to_1": "oscr_to_1: the reference code's OSCR (its curve ends at CCR 1, not at the closed-set accuracy).",
}


#: The near/far table's metrics: OpenOOD v1.5's (AUROC, and FPR95 with OOD as the positive class).
NEAR_FAR_METRICS = ("auroc", "fpr95_ood_pos")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and value == value else "n/a"


def _rows(report: dict, label: str, keys: tuple[str, ...]) -> list[str]:
    rows = [f"| {label} | {report.get('score', '')} | " + " | ".join(_fmt(report.get(k)) for k in keys) + " |"]
    for name, base in (report.get("baselines") or {}).items():
        rows.append(f"| {label} | {name} | " + " | ".join(_fmt(base.get(k)) for k in keys) + " |")
    return rows


def metrics_table(summary: dict, run_name: str) -> str:
    """The run's metrics as Markdown: one row per (evaluation set, score), near/far means,
    AUROC per unknown class; the columns are the protocol's (`summary["metric_keys"]`)."""
    keys = tuple(summary.get("metric_keys") or METRIC_KEYS)
    head = "| set | score | " + " | ".join(keys) + " |"
    sep = "|" + "---|" * (len(keys) + 2)
    lines = [f"## {run_name}", "", head, sep, *_rows(summary, "test", keys)]
    for name, report in (summary.get("ood") or {}).items():
        lines.extend(_rows(report, name, keys))
    for group, means in (summary.get("ood_groups") or {}).items():
        lines.append(f"| {group} mean ({len(means.get('sets', []))} sets) | {summary.get('score', '')} | "
                     + " | ".join(_fmt(means.get(k)) for k in keys) + " |")
    if "headline_auroc" in summary:
        lines += ["", f"Headline AUROC ({summary.get('score')}): {_fmt(summary['headline_auroc'])}, "
                      f"of: {summary.get('headline_auroc_of')}."]
    per_class = summary.get("per_unknown_class_auroc") or {}
    if per_class:
        lines += ["", f"AUROC per unknown class ({summary.get('score')}):", "",
                  "| unknown class | auroc |", "|---|---|"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in per_class.items()]
    notes = [NOTES[k] for k in keys if k in NOTES]
    if summary.get("not_reported"):
        notes += [f"{k}: not reported ({why})." for k, why in summary["not_reported"].items()]
    lines += [""] + notes if notes else []
    return "\n".join(lines) + "\n"


def _score_metrics(report: dict, score: str) -> dict:
    """One set's metrics of `score`: the report itself for its primary score, else its baseline entry."""
    return report if score == report.get("score") else (report.get("baselines") or {}).get(score) or {}


def near_far_table(summary: dict) -> tuple[list[str], list[list]]:
    """OpenOOD's near/far table of one run: a row per score (primary, then the baselines), AUROC
    and FPR95 of every OOD set (the split's own unknowns first when it has them), then their
    near and far means, which are formed here for every score (`ood_groups` holds the primary
    score's only). `([], [])` without OOD groups. W&B shows it as the table
    `final/tables/near_far` (docs/openood_imagenet.md, step 7)."""
    groups = {g: v.get("sets") or [] for g, v in (summary.get("ood_groups") or {}).items() if isinstance(v, dict)}
    if not any(groups.values()):
        return [], []
    ood, members = summary.get("ood") or {}, {name for names in groups.values() for name in names}
    sets = {name: summary for name in sorted(members - set(ood))}  # the split's unknowns: the test set itself
    sets.update({name: report for name, report in ood.items() if name in members})
    ordered = [g for g in ("near", "far") if groups.get(g)] + sorted(g for g in groups if g not in ("near", "far"))
    columns = ["score"] + [f"{name} {m}" for name in [*sets, *ordered] for m in NEAR_FAR_METRICS]
    rows = []
    for score in [summary.get("score"), *(summary.get("baselines") or {})]:
        row: list = [score]
        for name, report in sets.items():
            row += [_score_metrics(report, score).get(m) for m in NEAR_FAR_METRICS]
        for group in ordered:
            for m in NEAR_FAR_METRICS:
                values = [_score_metrics(sets[n], score).get(m) for n in groups[group]]
                numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
                row.append(sum(numbers) / len(numbers) if numbers and len(numbers) == len(values) else None)
        rows.append(row)
    return columns, rows
