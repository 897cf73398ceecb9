"""Issue 10 end to end, as a user runs ImageNet: raw folders -> tools/make_shards.py -> the ImageNet
fine-tuning config (cssr_ft, frozen timm backbone) on 2 processes -> one-pass multi-OOD evaluation
(a near and a far set) -> tools/predict.py on the run."""

from __future__ import annotations

import csv
import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from torchvision import transforms as T

from cssr_dist.config import load_config
from cssr_dist.apps.make_shards.cli import main as make_shards
from cssr_dist.data.transforms import build_transform
from cssr_dist.apps.predict import UNKNOWN, main as predict_main
from cssr_dist.engine.checkpoint import FROZEN_HASH, frozen_sha256, load_weights
from tests.helpers import launch_train, write_imagenet_tree

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
BACKBONE = "resnet10t"  # a small timm ResNet (512 channels) with ImageNet normalisation in its pretrained config


def _normalize(transform) -> T.Normalize:
    return next(t for t in transform.transforms if isinstance(t, T.Normalize))


@pytest.mark.slow
def test_imagenet_tree_to_frozen_finetune_with_near_and_far_ood_and_predict(tmp_path):
    raw = write_imagenet_tree(tmp_path / "raw", WNIDS, per_class=16, val_per_class=4,
                              ood={"ssb_hard": (1, 8), "textures": (None, 8)})  # near: a known colour; far: noise
    shards = tmp_path / "shards"
    opts = ["--samples-per-shard", "8", "--no-progress"]
    assert make_shards(["--source", "imagefolder", "--root", str(raw["train"]), "--out", str(shards / "imagenet-train"),
                        *opts]) == 0
    assert make_shards(["--source", "flat", "--root", str(raw["val"]), "--labels", str(raw["labels"]),
                        "--classes-from", str(shards / "imagenet-train.json"), "--out", str(shards / "imagenet-val"),
                        *opts]) == 0
    for name in ("ssb_hard", "textures"):
        assert make_shards(["--source", "ood", "--root", str(raw[name]), "--out", str(shards / f"ood-{name}"),
                            "--samples-per-shard", "4", "--no-progress"]) == 0

    # the "pretrained" weights: a seeded random init saved as a file, so the frozen check has a reference
    torch.manual_seed(7)
    init = {k: v.clone().contiguous() for k, v in timm.create_model(BACKBONE).state_dict().items()}
    save_file(init, str(tmp_path / "init.safetensors"))

    out = launch_train(tmp_path, [
        "--config", "configs/imagenet/rcssr.yaml", f"run.output_dir={tmp_path / 'runs'}", "run.name=ft",
        f"data.root={shards}",  # the config's prefixes (imagenet-train, ood-ssb_hard, ...) resolve here
        # data.dataset stays the config's imagenet: its 4 synsets are counted from the shard index
        f"model.backbone={BACKBONE}", "model.pretrained=false", f"model.pretrained_file={tmp_path / 'init.safetensors'}",
        "data.image_size=32", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=1",
        "data.ood=[{name: ssb_hard, shards: ood-ssb_hard, group: near}, {name: textures, shards: ood-textures, group: far}]",
        "run.mixed_precision=no", "run.checkpoint_every_steps=0", "schedule.epochs=2", "schedule.warmup_epochs=0",
        "schedule.milestones=[1]", "tracking.wandb=false", "run.progress=false"], processes=2, timeout=240)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 0, errors or out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs" / "ft"

    # the backbone's own normalisation (data.mean/std null) reached config.yaml and both transforms
    cfg = load_config(run / "config.yaml")
    pretrained = timm.models.get_pretrained_cfg(BACKBONE)
    assert cfg.data.mean == pytest.approx(list(pretrained.mean)) and cfg.data.std == pytest.approx(list(pretrained.std))
    for train in (True, False):
        norm = _normalize(build_transform(cfg.data, train=train))
        assert list(norm.mean) == pytest.approx(list(pretrained.mean)) and list(norm.std) == pytest.approx(list(pretrained.std))
    assert cfg.run.method == "cssr_ft" and cfg.model.freeze_backbone

    # frozen: best/ holds the head and the hash of the backbone it needs; that hash, taken from the
    # model after training, is the hash of the initial file's tensors: every backbone tensor (weights
    # AND BatchNorm statistics) stayed bit-identical
    best, meta = load_weights(run / "checkpoints" / "best")
    assert not any(k.startswith("model.backbone.") for k in best)
    frozen = {f"backbone.model.{k}": v for k, v in init.items() if not k.startswith("fc.")}
    assert len(frozen) > 50 and meta[FROZEN_HASH] == frozen_sha256(frozen, list(frozen))
    assert meta["frozen_tensors"] == str(len(frozen))
    head = [v for k, v in best.items() if k.startswith("model.head.")]
    assert head and all(torch.isfinite(v.float()).all() for v in head)

    # one pass over every OOD set, a row each, near/far means (no test unknowns: split_family none)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["score"] == "s0"
    assert summary["num_test_known"] == 16 and summary["num_test_unknown"] == 0  # every val image once
    assert set(summary["ood"]) == {"ssb_hard", "textures"}
    for row in summary["ood"].values():
        assert {"auroc", "fpr95_known_pos", "fpr95_ood_pos", "aupr_in", "aupr_out"} <= set(row)
        assert 0.0 <= row["auroc"] <= 1.0
    groups = summary["ood_groups"]
    assert groups["near"]["sets"] == ["ssb_hard"] and groups["far"]["sets"] == ["textures"]
    assert groups["near"]["auroc"] == pytest.approx(summary["ood"]["ssb_hard"]["auroc"])
    assert groups["far"]["auroc"] == pytest.approx(summary["ood"]["textures"]["auroc"])
    metrics_md = (run / "metrics.md").read_text()
    assert "ssb_hard" in metrics_md and "textures" in metrics_md

    # predict.py on that run: a folder of JPEGs and a shard prefix
    preds = tmp_path / "preds.csv"
    assert predict_main(["--run", str(run), str(raw["val"]), str(shards / "ood-textures"), "--out", str(preds),
                         "--device", "cpu"]) == 0
    with open(preds, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16 + 8
    assert all(r["path"].startswith(str(shards / "ood-textures") + "#") for r in rows[16:])
    assert {r["closed_set_class"] for r in rows} <= set(WNIDS)  # the index's class names, in the model's order
    for r in rows:
        assert float(r["threshold"]) == pytest.approx(summary["threshold"])
        assert r["prediction"] == (UNKNOWN if float(r["score"]) < float(r["threshold"]) else r["closed_set_class"])
