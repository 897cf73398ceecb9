"""Evaluation plots (local PNG) and W&B content of an evaluation (a real offline W&B run)."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cssr_dist.config import load_config
from cssr_dist.eval import metrics as M
from cssr_dist.eval.plots import histogram_figure, per_class_rows, roc_figure, thin_curve, write_evaluation_plots
from cssr_dist.wandb_offline import find_offline_runs, read_offline_run
from cssr_dist.tracking import experiment_group, log_evaluation, wandb_config, wandb_init_kwargs, wandb_tags

SCORE_NAMES = ("integrated", "s0", "s1", "s2", "msp", "mls", "energy")


def _evaluation(seed: int = 0, n_known: int = 300, n_unknown: int = 200):
    rng = np.random.default_rng(seed)
    labels = np.r_[rng.integers(0, 4, n_known), -np.ones(n_unknown, int)]
    shift = {name: i * 0.3 for i, name in enumerate(SCORE_NAMES)}
    scores = {name: rng.normal(size=labels.size) + shift[name] * (labels >= 0) for name in SCORE_NAMES}
    scores["s2"] = scores["s2"] * 1e9  # S2 reaches 1e10: the plots must cope
    return scores, labels


def test_roc_points_are_the_curve_auroc_integrates():
    known, unknown = np.array([4.0, 3.0, 2.0, 1.0]), np.array([3.5, 0.5])
    fpr, tpr = M.roc_points(known, unknown)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.auroc(known, unknown)) == pytest.approx(5 / 8)
    assert M.roc_points(known, np.array([]))[0].size == 0
    x, y = thin_curve(np.arange(5000.0), np.arange(5000.0), 100)
    assert x.size <= 101 and x[0] == 0 and x[-1] == 4999


def test_figures_draw_every_score_and_both_groups():
    scores, labels = _evaluation()
    fig = roc_figure({n: (s, labels) for n, s in scores.items()}, "ROC")
    lines = fig.axes[0].get_lines()
    assert len(lines) == len(SCORE_NAMES) + 1  # + chance diagonal
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    auroc = M.auroc(scores["mls"][labels >= 0], scores["mls"][labels < 0])
    assert f"mls (AUROC {auroc:.3f})" in legend
    hist = histogram_figure(scores["s2"], labels, "s2")
    labels_drawn = [t.get_text() for t in hist.axes[0].get_legend().get_texts()]
    assert labels_drawn == ["known (n=300)", "unknown (n=200)"]
    # density histograms: each group integrates to 1 over the drawn range
    for container in hist.axes[0].containers:
        area = sum(p.get_height() * p.get_width() for p in container.patches)
        assert area == pytest.approx(1.0, rel=1e-6)


def test_per_class_rows_hardest_first():
    rows = per_class_rows({"cat": 0.6, "ship": 0.9, "dog": None, "frog": 0.55})
    assert [r[0] for r in rows] == ["frog", "cat", "ship", "dog"] and math.isnan(rows[-1][1])


def test_write_evaluation_plots(tmp_path):
    scores, labels = _evaluation()
    paths = write_evaluation_plots(tmp_path, scores, labels, "ood/SUN", {"cat": 0.61, "dog": 0.72})
    names = sorted(p.name for p in paths)
    assert names == sorted(["ood_SUN_roc.png", "ood_SUN_per_unknown_class_auroc.csv"]
                           + [f"ood_SUN_hist_{n}.png" for n in SCORE_NAMES])
    assert all(p.parent == tmp_path / "plots" for p in paths)
    with Image.open(tmp_path / "plots" / "ood_SUN_roc.png") as img:
        assert img.format == "PNG" and img.size == (450, 400)
    assert (tmp_path / "plots" / "ood_SUN_per_unknown_class_auroc.csv").read_text().splitlines() == [
        "unknown_class,auroc", "cat,0.61", "dog,0.72"]


def test_no_empty_plot_for_a_set_without_unknowns_or_scores(tmp_path):
    """A split-less test set has no unknowns: no ROC curve can be drawn, so no ROC file (an
    empty "ROC (final)" was written before); a score without a finite value gets no histogram."""
    scores, labels = _evaluation()
    known = labels >= 0
    scores = {name: s[known] for name, s in scores.items()}
    scores["s2"] = np.full(known.sum(), np.nan)
    paths = write_evaluation_plots(tmp_path, scores, labels[known], "final")
    assert sorted(p.name for p in paths) == sorted(f"final_hist_{n}.png" for n in SCORE_NAMES if n != "s2")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)


def test_wandb_naming_groups_a_family_and_tags_what_varies():
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs/cifar10/pcssr.yaml",
                      ["data.split=c", "tracking.tags=[mine]", "run.seed=3"])
    assert experiment_group(cfg) == "cifar10_pcssr"
    assert wandb_tags(cfg) == ["dataset:cifar10", "split:cssr/c", "method:pcssr", "protocol:clean",
                               "backbone:wrn40_4", "seed:3", "mine"]
    kw = wandb_init_kwargs(cfg, Path("/tmp/x"), "id1", job_type="eval")
    assert (kw["group"], kw["job_type"], kw["tags"][0]) == ("cifar10_pcssr", "eval", "dataset:cifar10")
    assert "project" not in kw  # Accelerate passes cfg.tracking.project itself
    ref = load_config(None, ["eval.protocol=reference", "data.split_file=exps/cifar10/spl_b.json"])
    assert experiment_group(ref) == "fashion_mnist_rcssr_reference" and "split:spl_b" in wandb_tags(ref)
    config = wandb_config(cfg, world_size=2)
    assert config["split"] == "cssr/c" and config["world_size"] == 2 and "git_revision" in config
    assert config["model/head"] == "pcssr" and config["data/global_batch_size"] == 128


def test_offline_wandb_run_holds_metrics_plots_tables_and_no_api_key(tmp_path, monkeypatch):
    """A real offline W&B run through Accelerate's tracker: every key, picture and table of an
    evaluation lands in the run files, and a (fake) API key in the environment lands nowhere."""
    from accelerate import PartialState
    from accelerate.tracking import WandBTracker

    PartialState(cpu=True)  # Accelerate's tracker logs through its process-aware logger
    fake_key = "local-0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", fake_key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["run.name=wb", f"run.output_dir={tmp_path}"])
    run_dir = tmp_path / "wb"
    run_dir.mkdir()
    kwargs = wandb_init_kwargs(cfg, run_dir, "testrun01")
    assert kwargs["mode"] == "offline"
    tracker = WandBTracker(cfg.tracking.project, **kwargs)
    tracker.start()
    tracker.store_init_configuration(wandb_config(cfg, world_size=1))
    accelerator = types.SimpleNamespace(is_main_process=True, trackers=[tracker])
    scores, labels = _evaluation()
    summary = {"closed_acc": 0.9, "auroc": 0.8, "score": "integrated", "baselines": {"msp": {"auroc": 0.7}},
               "per_unknown_class_auroc": {"shirt": 0.6, "bag": 0.95}}
    tracker.log({"train/loss": 1.5, "train/lr": 0.1, "train/images_per_s": 900.0}, step=10)
    assert log_evaluation(accelerator, summary, scores, labels, step=20, prefix="test")
    assert log_evaluation(accelerator, summary, {"integrated": scores["integrated"]}, labels, step=30, prefix="final")
    assert not log_evaluation(types.SimpleNamespace(is_main_process=False, trackers=[tracker]), summary, scores,
                              labels, step=20)
    tracker.finish()
    import wandb

    wandb.teardown()  # the wandb-core service flushes the run file when it stops (as at process exit)

    (offline,) = find_offline_runs(run_dir)
    run = read_offline_run(offline)
    assert run.finished
    assert {"train/loss", "train/lr", "train/images_per_s", "test/closed_acc", "test/auroc",
            "test/baselines/msp/auroc", "test/per_unknown_class_auroc/shirt"} <= run.history_keys()
    assert run.summary["test/auroc"] == pytest.approx(0.8) and run.summary["train/loss"] == pytest.approx(1.5)
    for name in SCORE_NAMES:
        image = run.summary[f"test/hist/{name}"]
        assert image["_type"] == "image-file"
        with Image.open(offline / "files" / image["path"]) as img:
            assert img.format == "PNG"
    table = run.summary["test/tables/per_unknown_class_auroc"]
    assert table["_type"] == "table-file"
    assert json.loads((offline / "files" / table["path"]).read_text())["data"] == [["shirt", 0.6], ["bag", 0.95]]
    roc = json.loads((offline / "files" / run.summary["test/roc_table"]["path"]).read_text())
    assert {row[1] for row in roc["data"]} == set(SCORE_NAMES)  # one ROC line per score
    assert run.config["split"] == "builtin/default" and "git_revision" in run.config
    assert run.config["eval/protocol"] == "clean"
    # tools/collect_metrics.py --source wandb reads the same run back
    from cssr_dist.apps.results import read_wandb_run, metric_value

    result = read_wandb_run(run_dir)
    assert (result.dataset, result.method, result.split, result.path) == ("fashion_mnist", "rcssr", "default", run_dir)
    assert metric_value(result.summary, "auroc") == pytest.approx(0.8)
    assert metric_value(result.summary, "auroc", "msp") == pytest.approx(0.7)
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and fake_key.encode() in p.read_bytes()]
    assert leaked == []
