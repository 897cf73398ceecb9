"""A real offline W&B run through train.py: what a dashboard user will find, and no secret in it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cssr_dist.wandb_offline import _records, find_offline_runs, read_offline_run
from tests.helpers import launch_train

FAKE_KEY = "local-feedc0ffee0123456789abcdef0123456789ab"
SCORES = ("integrated", "s0", "s1", "s2", "msp", "mls", "energy")
TINY = ["--config", "configs/smoke.yaml", "run.name=wb", "data.train_per_class=30", "data.test_per_class=10",
        "data.stats_per_class=30", "schedule.epochs=2", "eval.test_interval=1", "run.progress=false",
        "tracking.log_every=1"]


def _run_record(offline) -> dict:
    """Project, group, job type and tags: the `run` record of the .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = offline.glob("run-*.wandb")
    for raw in _records(path.read_bytes(), path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            return {"project": record.run.project, "group": record.run.run_group, "job_type": record.run.job_type,
                    "tags": list(record.run.tags)}
    raise AssertionError("no run record")


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb_run")
    out = launch_train(tmp, [*TINY, f"run.output_dir={tmp / 'runs'}"], processes=1,
                       extra_env={"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp / "runs" / "wb"
    (offline,) = find_offline_runs(run_dir)
    return tmp, run_dir, offline, read_offline_run(offline), out


@pytest.mark.slow
def test_history_has_training_every_evaluation_every_score_and_ood_set(wandb_run):
    _, _, _, run, _ = wandb_run
    assert run.finished
    keys = run.history_keys()
    assert {"train/loss", "train/lr", "epoch/train_loss", "epoch/val_acc", "epoch/lr"} <= keys
    for prefix in ("test", "final", "final/ood/mnist", "final/ood/animal_mnist"):
        assert {f"{prefix}/auroc", f"{prefix}/oscr", f"{prefix}/closed_acc"} <= keys, prefix
        assert {f"{prefix}/auroc_by_score/{s}" for s in SCORES} <= keys, prefix
        assert {f"{prefix}/baselines/{b}/auroc" for b in ("msp", "mls", "energy")} <= keys, prefix
    # the epoch row of an epoch with a test evaluation is kept (W&B drops rows logged at a step
    # below its counter: evaluations must not advance it)
    assert sorted(row["epoch/epoch"] for row in run.history if "epoch/epoch" in row) == [1, 2]


@pytest.mark.slow
def test_summary_matches_the_run_folder_and_holds_plots_and_tables(wandb_run):
    _, run_dir, offline, run, _ = wandb_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.summary["final/auroc"] == pytest.approx(summary["auroc"])
    assert run.summary["final/baselines/mls/auroc"] == pytest.approx(summary["baselines"]["mls"]["auroc"])
    assert run.summary["final/auroc_by_score/integrated"] == pytest.approx(summary["auroc"])
    assert run.summary["final/ood/mnist/auroc"] == pytest.approx(summary["ood"]["mnist"]["auroc"])
    for prefix in ("final", "final/ood/mnist"):
        for score in SCORES:
            image = run.summary[f"{prefix}/hist/{score}"]
            with Image.open(offline / "files" / image["path"]) as img:
                assert img.format == "PNG"
        roc = json.loads((offline / "files" / run.summary[f"{prefix}/roc_table"]["path"]).read_text())
        assert {row[1] for row in roc["data"]} == set(SCORES)
    table = json.loads((offline / "files" / run.summary["final/tables/per_unknown_class_auroc"]["path"]).read_text())
    assert {row[0]: row[1] for row in table["data"]} == pytest.approx(summary["per_unknown_class_auroc"])
    assert set(summary["per_unknown_class_auroc"]) == {"T-shirt/top", "Pullover", "Coat", "Shirt"}  # smoke.yaml's split


@pytest.mark.slow
def test_naming_config_and_no_secret_anywhere(wandb_run):
    tmp, _, offline, run, out = wandb_run
    assert _run_record(offline) == {
        "project": "cssr-dist", "group": "fashion_mnist_rcssr", "job_type": "train",
        "tags": ["dataset:fashion_mnist", "split:known/1-3-5-7-8-9", "method:rcssr", "protocol:clean",
                 "backbone:osr_cnn", "seed:0"]}
    assert run.config["split"] == "known/1-3-5-7-8-9" and run.config["model/head"] == "rcssr"
    assert run.config["git_revision"] and run.config["world_size"] == 1
    leaked = [p for p in tmp.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == [] and FAKE_KEY not in out.stdout + out.stderr
