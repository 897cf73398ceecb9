"""Issue 3 end to end: raw trees -> tools/make_shards.py -> train.py (data.format=shards) -> summary."""

import json
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from cssr_dist.apps.make_shards.cli import main as make_shards
from tests.helpers import launch_train

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def _jpeg(path: Path, cls: int, seed: int) -> None:
    """A class-dependent colour + noise, so a few steps can learn the classes."""
    rng = np.random.default_rng(seed)
    base = np.zeros((40, 48, 3), np.uint8) + np.array([60 * cls, 255 - 60 * cls, 40 * (cls % 2)], np.uint8)
    noise = rng.integers(0, 40, base.shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(base + noise).save(path, quality=90)


def _imagenet_tree(root: Path, per_class: int = 24, val_per_class: int = 6) -> tuple[Path, Path, Path]:
    """train/<wnid>/*.JPEG, a flat val/ with a 'filename wnid' ground-truth file, an OOD folder."""
    train, val, ood = root / "train", root / "val", root / "inat"
    lines, n = [], 0
    for c, wnid in enumerate(WNIDS):
        for i in range(per_class):
            _jpeg(train / wnid / f"{wnid}_{i}.JPEG", c, 1000 * c + i)
        for i in range(val_per_class):
            n += 1
            name = f"ILSVRC2012_val_{n:08d}.JPEG"
            _jpeg(val / name, c, 50000 + n)
            lines.append(f"{name} {wnid}\n")
    (root / "val_labels.txt").write_text("".join(lines))
    for i in range(12):
        _jpeg(ood / "plants" / f"{i}.jpg", 3, 90000 + i)  # like a known class, labelled unknown
    return train, val, ood


@pytest.mark.slow
def test_imagenet_layout_and_ood_folder_train_and_evaluate_from_shards(tmp_path):
    train, val, ood = _imagenet_tree(tmp_path / "raw")
    shards = tmp_path / "shards"
    common = ["--samples-per-shard", "16", "--no-progress"]
    assert make_shards(["--source", "imagefolder", "--root", str(train), "--out", str(shards / "in-train"), *common]) == 0
    assert make_shards(["--source", "flat", "--root", str(val), "--labels", str(tmp_path / "raw" / "val_labels.txt"),
                        "--classes-from", str(shards / "in-train.json"), "--out", str(shards / "in-val"),
                        "--verify", *common]) == 0
    # several shards per set, so that rank/worker splitting is exercised
    assert make_shards(["--source", "ood", "--root", str(ood), "--out", str(shards / "inat"),
                        "--samples-per-shard", "4", "--no-progress"]) == 0
    _garble_first_image(shards / "inat-000001.tar")  # one corrupt OOD sample: skipped and counted

    out = launch_train(tmp_path, [
        "--config", "configs/smoke.yaml", f"run.output_dir={tmp_path / 'runs'}", "run.name=in_shards",
        "data.format=shards", "data.dataset=imagenet", "data.split_family=none", "data.known=[0,1,2]",
        f"data.shards.train={shards / 'in-train'}", f"data.shards.test={shards / 'in-val'}",
        f"data.ood=[{{name: inaturalist, shards: {shards / 'inat'}}}]",
        "data.in_chans=3", "data.image_size=32", "data.test_resize=32", "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.25,0.25,0.25]", "data.train_per_class=null", "data.test_per_class=null",
        "data.stats_per_class=null", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=1",
        "data.train_augment=flip_crop", "schedule.epochs=2", "tracking.wandb=false",
        "data.shards.max_corrupt_fraction=0.5"], processes=2, timeout=150)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "in_shards" / "summary.json").read_text())
    assert summary["num_test_known"] == 18 and summary["num_test_unknown"] == 6   # every val image once
    assert summary["closed_acc"] > 0.5                                             # chance 1/3
    assert set(summary["ood"]) == {"inaturalist"}
    assert 0.0 <= summary["ood"]["inaturalist"]["auroc"] <= 1.0
    # counted after the OOD sets were read (issue 19: `seen 0` before), once for this evaluation
    # (epoch 1's test evaluation read every set too), summed over both ranks
    assert summary["corrupt_samples"]["ood/inaturalist"] == {"seen": 12, "skipped": 1}
    assert summary["corrupt_samples"]["test"] == {"seen": 24, "skipped": 0}


def _garble_first_image(shard: Path) -> None:
    """Zero the bytes of the shard's first image in place (the tar stays valid): an undecodable sample."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".jpg", ".jpeg", ".png", ".webp")))
    with open(shard, "r+b") as fh:
        fh.seek(member.offset_data)
        fh.write(bytes(member.size))


@pytest.mark.slow
def test_smoke_config_runs_from_fashion_mnist_shards(tmp_path):
    shards = tmp_path / "shards"
    for subset in ("train", "test"):
        assert make_shards(["--source", "torchvision", "--dataset", "fashion_mnist", "--root", str(tmp_path / "none"),
                            "--subset", subset, "--out", str(shards / f"fm-{subset}"), "--samples-per-shard", "5000",
                            "--no-progress"]) == 0
    out = launch_train(tmp_path, [
        "--config", "configs/smoke.yaml", f"run.output_dir={tmp_path / 'runs'}", "data.format=shards",
        f"data.shards.train={shards / 'fm-train'}", f"data.shards.test={shards / 'fm-test'}", "tracking.wandb=false",
        "data.ood=[]", "data.known=null"],  # the built-in default split (smoke.yaml's own split has other knowns)
        processes=1)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "smoke" / "summary.json").read_text())
    assert summary["num_test_known"] == 600 and summary["num_test_unknown"] == 400
    assert summary["closed_acc"] > 0.6
    assert set(summary["per_unknown_class_auroc"]) == {"Shirt", "Sneaker", "Bag", "Ankle boot"}
