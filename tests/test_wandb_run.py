"""A real offline W&B run through train.py: what a dashboard user will find, and no secret in it.

One split-less run, read back from its `.wandb` file: the full config (lists, OOD entries and
nulls included), every evaluation and score, `best/` as a model artifact, best epoch, train
time and images/s in the summary, the headline AUROC (near-OOD mean, said so), `train/loss`
once per epoch although `log_every` exceeds an epoch, and no empty plot."""

from __future__ import annotations

import base64
import hashlib
import json
import math

import pytest
import yaml
from PIL import Image

from cssr_dist.apps.results import read_run_folder, read_wandb_run
from cssr_dist.wandb_offline import _records, find_offline_runs, read_offline_run
from tests.helpers import launch_train

FAKE_KEY = "local-feedc0ffee0123456789abcdef0123456789ab"
SCORES = ("integrated", "s0", "s1", "s2", "msp", "mls", "energy")
# Split-less (ImageNet style: every class known, the unknowns are OOD sets, MNIST as near OOD),
# and a logging interval longer than an epoch: the cases issue 19 found W&B records lacking.
OOD = "[{name: mnist, source: mnist, group: near}, {name: animal_mnist, source: animal_mnist, group: far}]"
TINY = ["--config", "configs/smoke.yaml", "run.name=wb", "data.train_per_class=30", "data.test_per_class=10",
        "data.stats_per_class=30", "schedule.epochs=2", "eval.test_interval=1", "run.progress=false",
        "tracking.log_every=1000", "data.split_family=none", "data.known=null", f"data.ood={OOD}"]


def _run_record(offline) -> dict:
    """Project, group, job type and tags: the `run` record of the .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = offline.glob("run-*.wandb")
    for raw in _records(path.read_bytes(), path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            return {"project": record.run.project, "group": record.run.run_group, "job_type": record.run.job_type,
                    "tags": list(record.run.tags), "id": record.run.run_id}
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


def _md5_b64(path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


@pytest.mark.slow
def test_history_has_training_every_evaluation_every_score_and_ood_set(wandb_run):
    _, _, _, run, _ = wandb_run
    assert run.finished
    keys = run.history_keys()
    assert {"train/loss", "train/lr", "epoch/train_loss", "epoch/val_acc", "epoch/lr", "epoch/images_per_s"} <= keys
    for prefix in ("test", "final", "final/ood/mnist", "final/ood/animal_mnist"):
        assert {f"{prefix}/auroc", f"{prefix}/oscr", f"{prefix}/closed_acc"} <= keys, prefix
        assert {f"{prefix}/auroc_by_score/{s}" for s in SCORES} <= keys, prefix
        assert {f"{prefix}/baselines/{b}/auroc" for b in ("msp", "mls", "energy")} <= keys, prefix
    # the epoch row of an epoch with a test evaluation is kept (W&B drops rows logged at a step
    # below its counter: evaluations must not advance it)
    epochs = [row for row in run.history if "epoch/epoch" in row]
    assert sorted(row["epoch/epoch"] for row in epochs) == [1, 2]
    # log_every (1000) exceeds an epoch's steps: train/loss is still logged, once, at each epoch's end
    assert sorted(row["_step"] for row in run.history if "train/loss" in row) == sorted(r["epoch/step"] for r in epochs)


@pytest.mark.slow
def test_summary_holds_the_run_its_headline_and_only_plots_with_content(wandb_run):
    _, run_dir, offline, run, out = wandb_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_test_unknown"] == 0 and math.isnan(run.summary["final/auroc"])  # no split: no test AUROC
    # the headline of a split-less run: the near-OOD mean, and the summary says so
    assert run.summary["final/headline_auroc"] == pytest.approx(summary["ood_groups"]["near"]["auroc"])
    assert run.summary["final/headline_auroc"] == pytest.approx(summary["ood"]["mnist"]["auroc"])
    assert run.summary["final/headline_auroc_of"] == summary["headline_auroc_of"] == "near-OOD mean (mnist)"
    assert run.summary["final/ood/mnist/baselines/mls/auroc"] == pytest.approx(
        summary["ood"]["mnist"]["baselines"]["mls"]["auroc"])
    assert run.summary["final/ood/mnist/auroc"] == pytest.approx(summary["ood"]["mnist"]["auroc"])
    # the run itself: best epoch and how it was chosen (the line printed once), train time, images/s
    assert run.summary["best_epoch"] == summary["best_epoch"] in (1, 2)
    assert run.summary["best_selection"] == summary["best_selection"]
    assert summary["best_selection"].startswith(f"best epoch {summary['best_epoch']} (val_acc=")
    assert out.stdout.count(summary["best_selection"]) == 1
    assert run.summary["train_time_s"] == summary["train_time_s"] > 0
    assert run.summary["images_per_s"] == summary["images_per_s"] > 0
    # plots only where there is something to draw: no ROC without unknowns, here or in plots/
    for score in SCORES:
        with Image.open(offline / "files" / run.summary[f"final/hist/{score}"]["path"]) as img:
            assert img.format == "PNG"
    assert "final/roc_table" not in run.summary and not (run_dir / "plots" / "final_roc.png").exists()
    assert "final/tables/per_unknown_class_auroc" not in run.summary
    for prefix in ("final/ood/mnist", "final/ood/animal_mnist"):
        roc = json.loads((offline / "files" / run.summary[f"{prefix}/roc_table"]["path"]).read_text())
        assert {row[1] for row in roc["data"]} == set(SCORES)
    assert (run_dir / "plots" / "final_ood_mnist_roc.png").is_file()


@pytest.mark.slow
def test_best_checkpoint_is_a_model_artifact_of_the_offline_run(wandb_run):
    _, run_dir, _, run, _ = wandb_run
    best = run_dir / "checkpoints" / "best"
    (artifact,) = [a for a in run.artifacts if a.type == "model"]  # W&B logs each table as a run_table too
    assert (artifact.name, artifact.type) == (f"model-{_run_record(run.path)['id']}", "model")
    assert set(artifact.aliases) == {"latest", "best", f"epoch-{run.summary['best_epoch']}"}
    assert artifact.metadata["best_epoch"] == run.summary["best_epoch"]
    files = sorted(p for p in best.iterdir() if p.is_file())
    assert set(artifact.files) == {p.name for p in files} >= {"weights.safetensors"}
    for path in files:  # the files as they are now: what `wandb sync` will upload
        entry = artifact.files[path.name]
        assert (entry["size"], entry["digest"], entry["local_path"]) == (path.stat().st_size, _md5_b64(path),
                                                                         str(path))


@pytest.mark.slow
def test_naming_full_config_and_no_secret_anywhere(wandb_run):
    tmp, run_dir, offline, run, out = wandb_run
    record = _run_record(offline)
    assert {k: record[k] for k in ("project", "group", "job_type", "tags")} == {
        "project": "cssr-dist", "group": "fashion_mnist_rcssr", "job_type": "train",
        "tags": ["dataset:fashion_mnist", "split:none/default", "method:rcssr", "protocol:clean",
                 "backbone:osr_cnn", "seed:0"]}
    assert run.config["split"] == "none/default" and run.config["model/head"] == "rcssr"
    assert run.config["git_revision"] and run.config["world_size"] == 1
    # every setting, lists and nulls included, equal to the run folder's config.yaml
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    flat = {f"{section}/{key}": value for section, values in saved.items() for key, value in values.items()
            if not isinstance(value, dict)}
    assert {k: run.config[k] for k in flat} == flat
    assert run.config["data/ood"][0] == {"name": "mnist", "source": "mnist", "root": "", "group": "near"}
    assert run.config["data/known"] is None and run.config["data/train_per_class"] == 30
    assert run.config["data/mean"] == [0.286] and run.config["eval/baselines"] == ["msp", "mls", "energy"]
    assert isinstance(run.config["schedule/milestones"], list)
    # the collector reads the same experiment from W&B as from the run folder
    assert read_wandb_run(run_dir).fingerprint == read_run_folder(run_dir).fingerprint
    leaked = [p for p in tmp.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == [] and FAKE_KEY not in out.stdout + out.stderr


@pytest.mark.slow
def test_the_near_far_table_is_a_wandb_table_with_the_summarys_numbers(wandb_run):
    """docs/openood_imagenet.md, step 7: the table a user opens in W&B is OpenOOD's near/far table."""
    _, run_dir, offline, run, _ = wandb_run
    summary = json.loads((run_dir / "summary.json").read_text())
    table = json.loads((offline / "files" / run.summary["final/tables/near_far"]["path"]).read_text())
    assert table["columns"][0] == "score" and table["columns"][-4:] == [
        "near auroc", "near fpr95_ood_pos", "far auroc", "far fpr95_ood_pos"]
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert list(rows) == [summary["score"], "msp", "mls", "energy"]
    primary = rows[summary["score"]]
    assert primary["near auroc"] == pytest.approx(summary["ood_groups"]["near"]["auroc"])
    assert primary["far fpr95_ood_pos"] == pytest.approx(summary["ood_groups"]["far"]["fpr95_ood_pos"])
    assert rows["msp"]["mnist auroc"] == pytest.approx(summary["ood"]["mnist"]["baselines"]["msp"]["auroc"])
    assert rows["msp"]["far auroc"] == pytest.approx(summary["ood"]["animal_mnist"]["baselines"]["msp"]["auroc"])
