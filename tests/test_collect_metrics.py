"""Result tables from synthetic run folders: experiments kept apart, means and stds over
splits and seeds only, duplicates counted once, re-evaluations, the OpenOOD layout, near/far
rows of runs without a split, and one-line errors for unknown names."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cssr_dist.apps.results import build_table, metric_value, read_run_folder, render, scan, with_config_ood_order
from cssr_dist.apps.sweep import expand
from cssr_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _summary(auroc: float, msp: float = 0.5, far: float | None = None, unknowns: bool = True) -> dict:
    """A summary as the Evaluator writes it: test, two far OOD sets, near/far group means."""
    far = auroc + 0.05 if far is None else far
    ood = {"SUN": {"auroc": far, "fpr95_ood_pos": 0.4, "score": "integrated",
                   "baselines": {"msp": {"auroc": msp + 0.1, "fpr95_ood_pos": 0.6}}},
           "LSUN": {"auroc": far + 0.02, "fpr95_ood_pos": 0.3, "score": "integrated",
                    "baselines": {"msp": {"auroc": msp + 0.2, "fpr95_ood_pos": 0.5}}}}
    groups = {"far": {"auroc": far + 0.01, "sets": ["SUN", "LSUN"]}}
    if unknowns:
        groups["near"] = {"auroc": auroc, "sets": ["test unknowns"]}
    return {"closed_acc": 0.9, "auroc": auroc if unknowns else float("nan"), "fpr95_ood_pos": 0.5,
            "oscr": auroc - 0.1, "score": "integrated", "num_test_unknown": 10 if unknowns else 0,
            "baselines": {"msp": {"auroc": msp, "fpr95_ood_pos": 0.7}, "mls": {"auroc": None}},
            "ood": ood, "ood_groups": groups}


def _run(root: Path, dataset: str, method: str, split: str | None, auroc: float | None, msp: float = 0.5,
         seed: int = 0, protocol: str = "clean", backbone: str = "resnet18", folder: str | None = None,
         lr: float = 0.1) -> Path:
    """A run folder as the runner writes it (config.yaml; summary.json when finished)."""
    name = folder or f"{dataset}_{method}_{backbone}_{split}_s{seed}"
    path = root / name
    path.mkdir(parents=True)
    data = {"dataset": dataset, "split_family": "builtin" if split else "none", "split": split or "default",
            "split_file": None}
    config = {"run": {"name": name, "seed": seed}, "data": data, "model": {"head": method, "backbone": backbone},
              "optim": {"lr": lr}, "eval": {"protocol": protocol}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    if auroc is not None:
        (path / "summary.json").write_text(json.dumps(_summary(auroc, msp, unknowns=split is not None)))
    return path


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for split, a, b in (("0", 0.80, 0.60), ("1", 0.84, 0.62), ("2", 0.86, 0.64)):
        _run(root, "mnist", "rcssr", split, a, msp=b)
    for split, a in (("0", 0.70), ("1", 0.74)):
        _run(root, "mnist", "linear", split, a)
    _run(root, "mnist", "linear", "2", None)  # started, not finished
    _run(root, "mnist", "rcssr", "0", 0.50, backbone="wrn40_4")  # another backbone: another experiment
    _run(root, "fashion_mnist", "rcssr", "default", 0.78)
    return root


def _row(table, dataset: str, method: str, backbone: str = "resnet18", score: str = "primary"):
    rows = [r for r in table.rows if r[0][:3] == (dataset, method, backbone) and r[1] == score]
    assert len(rows) == 1, rows
    return rows[0]


def test_rows_are_experiments_and_cells_average_splits_only(runs):
    table = build_table(scan([runs]), "auroc")
    assert len(table.rows) == 4  # mnist rcssr x2 backbones, mnist linear, fashion_mnist rcssr
    cell = table.cells[(_row(table, "mnist", "rcssr"), ("test", "auroc"))]
    assert sorted(cell.values) == pytest.approx([0.80, 0.84, 0.86])  # not the wrn40_4 run's 0.50
    assert cell.std == pytest.approx(math.sqrt(((0.8 - 0.83333) ** 2 + (0.84 - 0.83333) ** 2
                                                + (0.86 - 0.83333) ** 2) / 2), rel=1e-4)
    other = table.cells[(_row(table, "mnist", "rcssr", "wrn40_4"), ("test", "auroc"))]
    assert other.values == [0.5] and math.isnan(other.std)
    linear = table.cells[(_row(table, "mnist", "linear"), ("test", "auroc"))]
    assert linear.mean == pytest.approx(0.72) and linear.std == pytest.approx(math.sqrt(0.0008))
    assert table.unfinished == ["mnist_linear_resnet18_2_s0"] and table.missing == [] and table.duplicates == []
    md = render(table)
    assert md.startswith("| dataset | method | backbone | protocol | fingerprint | score | n | test auroc |")
    assert "| mnist | rcssr | resnet18 | clean |" in md and "| primary | 3 | 0.833 ± 0.031 |" in md
    assert "| mnist | rcssr | wrn40_4 | clean |" in md and "| primary | 1 | 0.500 |" in md
    assert "unfinished runs (1): mnist_linear_resnet18_2_s0" in md and "none chosen by a test metric" in md


def test_a_changed_setting_is_another_experiment(tmp_path):
    root = tmp_path / "runs"
    _run(root, "mnist", "rcssr", "0", 0.8)
    _run(root, "mnist", "rcssr", "1", 0.9, folder="other_lr", lr=0.01)
    table = build_table(scan([root]), "auroc")
    assert len(table.rows) == 2 and {len(c.values) for c in table.cells.values()} == {1}
    assert len({r[0][4] for r in table.rows}) == 2  # two fingerprints


def test_same_config_split_and_seed_twice_counts_once_and_is_reported(runs, tmp_path):
    again = _run(runs, "mnist", "rcssr", "1", 0.99, msp=0.9, folder="mnist_rcssr_again")
    os.utime(again / "summary.json", (4e9, 4e9))  # the newest
    table = build_table(scan([runs]), "auroc")
    cell = table.cells[(_row(table, "mnist", "rcssr"), ("test", "auroc"))]
    assert sorted(cell.values) == pytest.approx([0.80, 0.86, 0.99]) and len(cell.values) == 3
    assert len(table.duplicates) == 1 and "split 1 seed 0 found 2 times" in table.duplicates[0]
    assert "duplicates (1): mnist/rcssr split 1 seed 0" in render(table)


def test_csv_has_run_backbone_and_fingerprint(runs):
    table = build_table(scan([runs]), "oscr")
    rows = render(table, "csv").splitlines()
    assert rows[0] == "run,dataset,method,backbone,protocol,fingerprint,score,set,metric,mean,std,n,expected"
    line = next(r for r in rows if r.startswith("mnist_rcssr_resnet18_0_s0;"))
    fields = line.split(",")
    assert fields[0] == "mnist_rcssr_resnet18_0_s0;mnist_rcssr_resnet18_1_s0;mnist_rcssr_resnet18_2_s0"
    assert fields[1:4] == ["mnist", "rcssr", "resnet18"] and len(fields[5]) == 16
    assert fields[6:] == ["primary", "test", "oscr", "0.733333", "0.0305505", "3", ""]
    per_run = render(table, "csv", per_run=True).splitlines()
    assert per_run[0].startswith("run,dataset,method,backbone,protocol,fingerprint,split,seed,evaluation,")
    assert any(r.startswith("mnist_rcssr_wrn40_4_0_s0,mnist,rcssr,wrn40_4,clean,") and r.endswith(",0.4")
               for r in per_run)


def test_openood_layout_per_set_and_group_means_for_any_score(runs):
    table = build_table(scan([runs]), scores=["primary", "msp"], layout="openood")
    sets = [c[0] for c in table.columns[::2]]
    assert sets == ["test unknowns", "SUN", "LSUN", "near", "far"]
    assert [c[1] for c in table.columns[:2]] == ["auroc", "fpr95_ood_pos"]
    row = _row(table, "mnist", "rcssr", score="msp")
    assert table.cells[(row, ("SUN", "auroc"))].mean == pytest.approx(0.72)
    assert table.cells[(row, ("far", "auroc"))].mean == pytest.approx(np.mean([0.72, 0.82]))
    assert table.cells[(row, ("far", "fpr95_ood_pos"))].mean == pytest.approx(0.55)
    assert table.cells[(row, ("near", "auroc"))].mean == pytest.approx(0.62)
    md = render(table)
    assert "| test unknowns auroc | test unknowns fpr95_ood_pos | SUN auroc |" in md and "OpenOOD v1.5" in md


def test_runs_without_a_split_give_near_and_far_rows(tmp_path):
    root = tmp_path / "runs"
    _run(root, "imagenet", "linear", None, 0.0, msp=0.6)
    table = build_table(scan([root]), "auroc", scores=["primary", "msp"], eval_set="far")
    assert table.cells[(_row(table, "imagenet", "linear", score="msp"), ("far", "auroc"))].mean == pytest.approx(0.75)
    assert table.cells[(_row(table, "imagenet", "linear"), ("far", "auroc"))].mean == pytest.approx(0.06)
    summary = read_run_folder(root / "imagenet_linear_resnet18_None_s0").summary
    assert metric_value(summary, "auroc") is None and metric_value(summary, "auroc", eval_set="near") is None


def test_reevaluation_is_included_and_marked(runs):
    folder = runs / "mnist_rcssr_resnet18_2_s0"
    reeval = _summary(0.95, msp=0.7)
    reeval["baselines"]["knn"] = {"auroc": 0.91}
    (folder / "summary_test.json").write_text(json.dumps(reeval))
    os.utime(folder / "summary_test.json", (4e9, 4e9))
    result = read_run_folder(folder)
    assert result.evaluation == "re-evaluation" and result.summary["auroc"] == 0.95
    table = build_table(scan([runs]), "auroc", scores=["primary", "knn"])
    cell = table.cells[(_row(table, "mnist", "rcssr"), ("test", "auroc"))]
    assert sorted(cell.values) == pytest.approx([0.80, 0.84, 0.95]) and cell.reevaluated
    assert table.cells[(_row(table, "mnist", "rcssr", score="knn"), ("test", "auroc"))].values == [0.91]
    md = render(table)
    assert "0.863 ± 0.078†" in md and "† includes re-evaluations" in md and "mnist_rcssr_resnet18_2_s0" in md
    os.utime(folder / "summary_test.json", (1e9, 1e9))  # older than summary.json: the training's final
    assert read_run_folder(folder).evaluation == "final"


def test_unknown_metric_score_or_set_stops_with_the_valid_names(runs):
    results = scan([runs])
    with pytest.raises(ConfigError) as err:
        build_table(results, "fpr95")
    text = str(err.value)
    assert text.startswith("unknown metric 'fpr95'") and "fpr95_ood_pos" in text and "\n" not in text
    with pytest.raises(ConfigError, match="unknown score.* 'vim'.*msp"):
        build_table(results, "auroc", scores=["primary", "vim"])
    with pytest.raises(ConfigError, match="unknown evaluation set 'iNat'.*SUN"):
        build_table(results, "auroc", eval_set="iNat")


def test_expected_grid_lists_missing_runs_and_marks_incomplete_cells(runs):
    expected = expand(["mnist"], ["linear", "rcssr"], splits=["0", "1", "2", "3"], configs_dir=ROOT / "configs")
    table = build_table(scan([runs]), "auroc", expected=expected)
    assert {r[0][0] for r in table.rows} == {"mnist"}  # fashion_mnist is not in the grid
    assert table.missing == ["mnist_linear_3_s0", "mnist_rcssr_3_s0"]
    assert table.cells[(_row(table, "mnist", "rcssr"), ("test", "auroc"))].incomplete
    text = render(table)
    assert "0.833 ± 0.031*" in text and "missing runs (2): mnist_linear_3_s0, mnist_rcssr_3_s0" in text


def test_latex(runs):
    latex = render(build_table(scan([runs]), "oscr"), "latex", digits=1, scale=100)
    assert latex.startswith("\\begin{tabular}{lllllllc}")
    assert "fashion\\_mnist & rcssr & resnet18 & clean &" in latex and "$73.3 \\pm 3.1$ \\\\" in latex


def test_tool_end_to_end(runs, tmp_path):
    out = tmp_path / "table.md"
    tool = [sys.executable, str(ROOT / "tools/collect_metrics.py")]
    proc = subprocess.run(tool + [str(runs), "--metric", "auroc", "--percent", "--digits", "1", "--output",
                                  str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| primary | 3 | 83.3 ± 3.1 |" in proc.stdout and out.read_text() == proc.stdout
    bad = subprocess.run(tool + [str(runs), "--metric", "fpr95"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: unknown metric 'fpr95'") and "fpr95_ood_pos" in bad.stderr
    missing = subprocess.run(tool + [str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "not a folder" in missing.stderr


def test_near_far_means_from_a_wandb_summary_without_the_groups_set_lists():
    """W&B's summary keeps ood_groups' numbers but not their `sets` lists: the primary score's group
    mean is read as logged (docs/openood_imagenet.md, step 7); other scores need the list."""
    folder = {"auroc": 0.9, "ood": {"a": {"auroc": 0.6}, "b": {"auroc": 0.8}},
              "ood_groups": {"near": {"auroc": 0.7, "sets": ["a", "b"]}}}
    logged = {"auroc": 0.9, "ood": {"a": {"auroc": 0.6}, "b": {"auroc": 0.8}}, "ood_groups": {"near": {"auroc": 0.7}}}
    assert metric_value(folder, "auroc", "primary", "near") == pytest.approx(0.7)
    assert metric_value(logged, "auroc", "primary", "near") == pytest.approx(0.7)
    assert metric_value(logged, "auroc", "msp", "near") is None and metric_value(logged, "auroc", "primary", "far") is None


def test_a_wandb_summary_gets_the_configs_set_order_and_group_lists():
    """Read back from W&B (no key order, no lists), a summary is made like summary.json from the
    run's config: OOD sets in data.ood's order (the OpenOOD layout's columns), and each group's
    sets, so the baselines' near/far means exist (docs/openood_imagenet.md, step 7)."""
    logged = {"num_test_unknown": 0, "ood_groups": {"near": {"auroc": 0.7}, "far": {"auroc": 0.5}},
              "ood": {"c": {"auroc": 0.5, "baselines": {"msp": {"auroc": 0.2}}},
                      "a": {"auroc": 0.6, "baselines": {"msp": {"auroc": 0.4}}},
                      "b": {"auroc": 0.8, "baselines": {"msp": {"auroc": 0.9}}}}}
    config = {"data": {"ood": [{"name": "a", "group": "near"}, {"name": "b", "group": "near"},
                               {"name": "c", "group": "far"}]}}
    summary = with_config_ood_order(logged, config)
    assert list(summary["ood"]) == ["a", "b", "c"]
    assert summary["ood_groups"]["near"]["sets"] == ["a", "b"] and summary["ood_groups"]["far"]["sets"] == ["c"]
    assert metric_value(summary, "auroc", "msp", "near") == pytest.approx(0.65)
    assert metric_value(summary, "auroc", "msp", "far") == pytest.approx(0.2)
    assert "sets" not in logged["ood_groups"]["near"]  # the input is left as it was
    # a split's own unknowns lead the near group, as in the evaluator
    split = with_config_ood_order({**logged, "num_test_unknown": 5}, config)
    assert split["ood_groups"]["near"]["sets"] == ["test unknowns", "a", "b"]
    # a set the config does not name: order kept after the named ones, groups left without lists
    odd = with_config_ood_order(logged, {"data": {"ood": [{"name": "b", "group": "near"}]}})
    assert list(odd["ood"]) == ["b", "c", "a"] and "sets" not in odd["ood_groups"]["near"]
