"""tools/predict.py on a tiny trained run: real Fashion-MNIST PNGs, a folder, a shard prefix,
CSV and JSON, the validation threshold, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import re
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cssr_dist.data.builtin_data import FASHION_MNIST_CLASSES, load_fashion_mnist, load_mnist
from cssr_dist.apps.make_shards.cli import main as make_shards
from cssr_dist.apps.predict import UNKNOWN, main as predict_main, restore_run
from tests.helpers import ROOT, launch_train

KNOWN = FASHION_MNIST_CLASSES[:6]  # the built-in split: T-shirt/top .. Sandal


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """configs/smoke.yaml cut to two short epochs (200 images per class, ~10 s of training), trained through train.py."""
    tmp = tmp_path_factory.mktemp("predict_run")
    out = launch_train(tmp, [
        "--config", "configs/smoke.yaml", f"run.output_dir={tmp / 'runs'}", "run.name=tiny",
        "schedule.epochs=2", "data.train_per_class=200", "data.test_per_class=20", "data.stats_per_class=20",
        "data.batch_size=32", "data.ood=[]", "eval.test_interval=0", "tracking.wandb=false", "run.progress=false",
        "data.known=null"],  # the built-in default split (smoke.yaml's own split has other knowns)
        processes=1, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return tmp / "runs" / "tiny"


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    """16 real Fashion-MNIST test images (every class) and 4 real MNIST digits, as PNG files."""
    folder = tmp_path_factory.mktemp("pngs") / "images"
    (folder / "digits").mkdir(parents=True)
    images, labels = load_fashion_mnist("data", train=False)
    for i in range(16):
        Image.fromarray(images[i]).save(folder / f"fm_{i:02d}_{labels[i]}.png")
    digits, _ = load_mnist("data", train=False)
    for i in range(4):
        Image.fromarray(digits[i]).save(folder / "digits" / f"mnist_{i}.png")
    return folder


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _check_rule(rows: list[dict]) -> None:
    for row in rows:
        score, threshold = float(row["score"]), float(row["threshold"])
        assert row["closed_set_class"] in KNOWN
        assert row["prediction"] == (UNKNOWN if score < threshold else row["closed_set_class"])


def test_predicts_pngs_and_folders_with_the_validation_threshold(trained_run, pngs, tmp_path, capsys):
    summary = json.loads((trained_run / "summary.json").read_text())
    out = tmp_path / "preds.csv"
    single = pngs / "fm_00_9.png"
    assert predict_main(["--run", str(trained_run), str(pngs), str(single), "--out", str(out),
                         "--batch-size", "7", "--device", "cpu"]) == 0
    rows = _rows(out)
    files = sorted(str(p) for p in pngs.rglob("*.png"))
    assert [r["path"] for r in rows] == files + [str(single)]  # folder sorted and recursive, then the file
    assert list(rows[0]) == ["path", "prediction", "score", "threshold", "closed_set_class", "closed_set_index"]
    assert all(float(r["threshold"]) == pytest.approx(summary["threshold"]) for r in rows)  # chosen on validation
    _check_rule(rows)
    assert float(rows[-1]["score"]) == pytest.approx(float(rows[files.index(str(single))]["score"]), rel=1e-5)
    # the trained model is better than chance (1/6) on the known-class Fashion-MNIST images
    labelled = [(r, int(Path(r["path"]).stem.split("_")[-1])) for r in rows[:-1] if Path(r["path"]).name.startswith("fm_")]
    known = [(r, label) for r, label in labelled if label < 6]
    correct = sum(r["closed_set_class"] == KNOWN[label] for r, label in known)
    assert len(known) == 11 and correct >= 6, (correct, len(known))

    # a threshold between the scores: both outcomes appear, by the same rule
    median = float(np.median([float(r["score"]) for r in rows]))
    assert predict_main(["--run", str(trained_run), str(pngs), "--out", str(out), "--threshold", str(median)]) == 0
    rows = _rows(out)
    _check_rule(rows)
    assert {r["prediction"] == UNKNOWN for r in rows} == {True, False}


def test_shard_prefix_gives_the_same_scores_as_the_files_and_json_output(trained_run, pngs, tmp_path):
    prefix = tmp_path / "shards" / "pngs"
    assert make_shards(["--source", "ood", "--root", str(pngs), "--out", str(prefix), "--samples-per-shard", "8",
                        "--encoding", "original", "--no-progress"]) == 0
    out_json, out_csv = tmp_path / "preds.json", tmp_path / "files.csv"
    assert predict_main(["--run", str(trained_run), str(prefix), "--out", str(out_json)]) == 0
    assert predict_main(["--run", str(trained_run), str(pngs), "--out", str(out_csv)]) == 0
    payload = json.loads(out_json.read_text())
    assert payload["score"] == "integrated" and payload["threshold_source"] == "validation"
    assert payload["classes"] == KNOWN
    rows = payload["predictions"]
    assert len(rows) == 20 and all(r["path"].startswith(f"{prefix}#") for r in rows)
    assert len({r["path"] for r in rows}) == 20  # one row per sample key, three shards
    by_file = sorted(float(r["score"]) for r in _rows(out_csv))
    np.testing.assert_allclose(sorted(r["score"] for r in rows), by_file, rtol=1e-5)  # same pixels, same scores


def test_bad_inputs_and_incomplete_runs_fail_in_one_line(trained_run, pngs, tmp_path, capsys):
    missing = tmp_path / "nothere.png"
    assert predict_main(["--run", str(trained_run), str(pngs), str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "does not exist" in err

    (tmp_path / "notes.txt").write_text("x")
    assert predict_main(["--run", str(trained_run), str(tmp_path / "notes.txt")]) == 2
    assert "is not an image" in capsys.readouterr().err

    no_best = tmp_path / "no_best"
    shutil.copytree(trained_run, no_best, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    assert predict_main(["--run", str(no_best), str(pngs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no best checkpoint" in err

    no_threshold = tmp_path / "no_threshold"
    shutil.copytree(trained_run, no_threshold, ignore=shutil.ignore_patterns("wandb"))
    summary = json.loads((no_threshold / "summary.json").read_text())
    (no_threshold / "summary.json").write_text(json.dumps({**summary, "threshold": None}))
    assert predict_main(["--run", str(no_threshold), str(pngs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no validation threshold" in err and "--threshold" in err
    assert restore_run(no_threshold, "cpu", threshold=0.5).threshold_source == "--threshold"

    assert predict_main(["--run", str(tmp_path / "absent"), str(pngs)]) == 2
    assert "does not exist" in capsys.readouterr().err

    mixed = tmp_path / "mixed"  # best/ of this run, config.yaml of a run with another latent size
    shutil.copytree(trained_run, mixed, ignore=shutil.ignore_patterns("wandb"))
    config = (mixed / "config.yaml").read_text()
    latent = re.search(r"latent_dim: (\d+)", config)
    (mixed / "config.yaml").write_text(config.replace(latent[0], f"latent_dim: {int(latent[1]) + 4}"))
    assert predict_main(["--run", str(mixed), str(pngs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has shape" in err and "mixed from two runs" in err, err


def test_tool_is_a_thin_wrapper(trained_run, pngs, capsys):
    tool = runpy.run_path(str(ROOT / "tools" / "predict.py"), run_name="predict_tool")
    assert tool["main"] is predict_main
