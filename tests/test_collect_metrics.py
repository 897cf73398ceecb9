"""Result tables from synthetic run folders: means, stds, missing and unfinished runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cssr_dist.apps.results import build_table, metric_value, read_run_folder, render, scan
from cssr_dist.apps.sweep import expand

ROOT = Path(__file__).resolve().parent.parent


def _run(root: Path, dataset: str, method: str, split: str, auroc: float | None, msp: float = 0.5,
         seed: int = 0, protocol: str = "clean") -> Path:
    """A run folder as the runner writes it (config.yaml; summary.json when finished)."""
    name = f"{dataset}_{method}_{split}_s{seed}"
    folder = root / name
    folder.mkdir(parents=True)
    config = {"run": {"name": name, "seed": seed}, "data": {"dataset": dataset, "split": split, "split_file": None},
              "model": {"head": method}, "eval": {"protocol": protocol}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if auroc is not None:
        summary = {"closed_acc": 0.9, "auroc": auroc, "oscr": auroc - 0.1, "score": "integrated",
                   "baselines": {"msp": {"auroc": msp}, "mls": {"auroc": None}},
                   "ood": {"SUN": {"auroc": auroc + 0.05, "score": "integrated", "baselines": {}}}}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for split, a, b in (("0", 0.80, 0.60), ("1", 0.84, 0.62), ("2", 0.86, 0.64)):
        _run(root, "mnist", "rcssr", split, a, msp=b)
    for split, a in (("0", 0.70), ("1", 0.74)):
        _run(root, "mnist", "linear", split, a)
    _run(root, "mnist", "linear", "2", None)  # started, not finished
    _run(root, "fashion_mnist", "rcssr", "default", 0.78)
    return root


def test_mean_std_per_method_and_dataset(runs):
    table = build_table(scan([runs]), "auroc")
    assert table.columns == ["fashion_mnist", "mnist"] and table.rows == [("linear", "primary"), ("rcssr", "primary")]
    cell = table.cells[(("rcssr", "primary"), "mnist")]
    assert sorted(cell.values) == pytest.approx([0.80, 0.84, 0.86])
    assert cell.mean == pytest.approx(0.8333333333)
    assert cell.std == pytest.approx(math.sqrt(((0.8 - 0.83333) ** 2 + (0.84 - 0.83333) ** 2 + (0.86 - 0.83333) ** 2) / 2), rel=1e-4)
    linear = table.cells[(("linear", "primary"), "mnist")]
    assert linear.mean == pytest.approx(0.72) and linear.std == pytest.approx(math.sqrt(0.0008))
    single = table.cells[(("rcssr", "primary"), "fashion_mnist")]
    assert single.mean == pytest.approx(0.78) and math.isnan(single.std)
    assert table.unfinished == ["mnist_linear_2_s0"] and table.missing == []
    md = render(table)
    assert "| method | fashion_mnist | mnist |" in md
    assert "| rcssr | 0.780 | 0.833 ± 0.031 |" in md and "| linear | - | 0.720 ± 0.028 |" in md
    assert "unfinished runs (1): mnist_linear_2_s0" in md and "none chosen by a test metric" in md


def test_scores_ood_sets_and_missing_values(runs):
    table = build_table(scan([runs]), "auroc", scores=["primary", "msp", "mls"])
    assert table.cells[(("rcssr", "msp"), "mnist")].mean == pytest.approx(0.62)
    assert table.cells[(("rcssr", "mls"), "mnist")].values == []  # null in the summary: no value, not 0
    assert "| rcssr / msp |" in render(table)
    summary = read_run_folder(runs / "mnist_rcssr_0_s0").summary
    assert metric_value(summary, "auroc", "integrated") == pytest.approx(0.80)  # the primary by name
    assert metric_value(summary, "auroc", "primary", "SUN") == pytest.approx(0.85)
    assert metric_value(summary, "auroc", "energy") is None and metric_value(summary, "nosuch") is None


def test_expected_grid_lists_missing_runs_and_marks_incomplete_cells(runs):
    expected = expand(["mnist"], ["linear", "rcssr"], splits=["0", "1", "2", "3"], configs_dir=ROOT / "configs")
    table = build_table(scan([runs]), "auroc", expected=expected)
    assert table.columns == ["mnist"]  # fashion_mnist is not in the grid
    assert table.missing == ["mnist_linear_3_s0", "mnist_rcssr_3_s0"]
    assert table.cells[(("rcssr", "primary"), "mnist")].incomplete
    text = render(table)
    assert "0.833 ± 0.031*" in text and "missing runs (2): mnist_linear_3_s0, mnist_rcssr_3_s0" in text


def test_csv_and_latex(runs):
    table = build_table(scan([runs]), "oscr")
    rows = render(table, "csv").splitlines()
    assert rows[0] == "method,score,dataset,metric,mean,std,n,expected"
    assert "rcssr,primary,mnist,oscr,0.733333,0.0305505,3," in rows
    latex = render(table, "latex", digits=1, scale=100)
    assert "fashion\\_mnist & mnist" in latex and "rcssr & $68.0$ & $73.3 \\pm 3.1$ \\\\" in latex
    assert latex.startswith("\\begin{tabular}{lcc}")


def test_tool_end_to_end(runs, tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/collect_metrics.py"), str(runs), "--metric", "auroc",
                           "--percent", "--digits", "1", "--output", str(out)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| rcssr | 78.0 | 83.3 ± 3.1 |" in proc.stdout and out.read_text() == proc.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools/collect_metrics.py"), str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "not a folder" in bad.stderr
