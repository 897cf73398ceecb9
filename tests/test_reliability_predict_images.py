"""predict never stops on one bad image (issue 20): unreadable, truncated, not-an-image and
oversized images (a real decompression bomb: 196 M pixels in a 25 KB PNG) each get a row with
prediction `error` and the reason; every other image is predicted; exit 0. Before issue 20
the first bad image ended the whole run with exit 2 and no predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cssr_dist.config import dump_yaml, load_config
from cssr_dist.data.builtin_data import FASHION_MNIST_CLASSES, load_fashion_mnist
from cssr_dist.engine.checkpoint import save_weights
from cssr_dist.models.osr_model import build_model
from cssr_dist.apps.predict import ERROR, main as predict_main
from cssr_dist.scoring.scores import Scorer, primary_score
from tests.helpers import ROOT

KNOWN = FASHION_MNIST_CLASSES[:6]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder as training leaves it (config.yaml, best/ weights + statistics, summary.json),
    with untrained weights: these tests are about the inputs, not the numbers."""
    run = tmp_path_factory.mktemp("predict_images") / "run"
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["data.known=null", "data.ood=[]", "eval.score=s0", f"data.root={ROOT / 'data'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, len(KNOWN), cfg.data.in_chans)
    channels = model.feature_channels(cfg.data.in_chans, cfg.data.image_size)
    scorer = Scorer(cfg.model.head, len(KNOWN), channels, primary_score(cfg.model.head, cfg.run.method, cfg.eval.score))
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"stats.{k}": v for k, v in scorer.stats.state_dict().items() if v is not None})
    save_weights(run / "checkpoints" / "best", tensors, {"epoch": 1})
    (run / "config.yaml").write_text(dump_yaml(cfg))
    (run / "summary.json").write_text(json.dumps({"score": scorer.primary, "threshold": 0.0, "class_names": KNOWN}))
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """4 good Fashion-MNIST PNGs and 4 bad files; returns the folder and {bad name: expected reason}."""
    folder = tmp_path_factory.mktemp("imgs") / "in"
    folder.mkdir()
    pixels, _ = load_fashion_mnist(str(ROOT / "data"), train=False)
    for i in range(4):
        Image.fromarray(pixels[i]).save(folder / f"good_{i}.png")
    whole = (folder / "good_0.png").read_bytes()
    (folder / "bad_truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "bad_text.png").write_text("this is not an image")
    (folder / "bad_empty.jpg").write_bytes(b"")
    Image.new("1", (14000, 14000)).save(folder / "bad_bomb.png")  # 196 M pixels > 2 x MAX_IMAGE_PIXELS
    assert (folder / "bad_bomb.png").stat().st_size < 100_000
    return folder, {"bad_truncated.png": "truncated", "bad_text.png": "UnidentifiedImageError",
                    "bad_empty.jpg": "UnidentifiedImageError", "bad_bomb.png": "DecompressionBombError"}


def test_bad_images_are_reported_and_the_rest_is_predicted(run_folder, images, tmp_path, capsys):
    folder, bad = images
    out = tmp_path / "pred.json"
    assert predict_main(["--run", str(run_folder), str(folder), "--out", str(out), "--device", "cpu",
                         "--batch-size", "3"]) == 0
    rows = {Path(r["path"]).name: r for r in json.loads(out.read_text())["predictions"]}
    assert sorted(rows) == sorted([f"good_{i}.png" for i in range(4)] + list(bad))
    for name, reason in bad.items():
        assert rows[name]["prediction"] == ERROR and reason in rows[name]["error"], rows[name]
        assert rows[name]["score"] is None
    for i in range(4):
        row = rows[f"good_{i}.png"]
        assert row["error"] is None and row["prediction"] != ERROR and np.isfinite(row["score"])
    assert "4 unreadable" in capsys.readouterr().err


def test_an_image_just_over_the_pixel_limit_is_refused_too(run_folder, tmp_path, monkeypatch, capsys):
    """PIL only warns between MAX_IMAGE_PIXELS and twice that; predict refuses it as well."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    Image.new("L", (28, 28)).save(tmp_path / "over.png")  # 784 px: PIL's warning zone
    Image.new("L", (20, 20)).save(tmp_path / "under.png")
    out = tmp_path / "p.csv"
    assert predict_main(["--run", str(run_folder), str(tmp_path / "over.png"), str(tmp_path / "under.png"),
                         "--out", str(out), "--device", "cpu"]) == 0
    text = out.read_text().splitlines()
    assert text[0].endswith(",error") and len(text) == 3
    assert ",error," in text[1] and "DecompressionBombWarning" in text[1] and ",error," not in text[2]
