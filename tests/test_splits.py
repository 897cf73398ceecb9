"""Open-set splits: published families, reference split files, config resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cssr_dist.data.splits import (
    OpenSetSplit,
    resolve_split,
    split_by_name,
    split_from_reference_file,
    valid_split_names,
)
from cssr_dist.errors import DataError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference_splits"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference_splits not present")


def test_packaged_splits_json_matches_shared_copy():
    packaged = Path(__file__).resolve().parents[1] / "cssr_dist" / "data" / "splits.json"
    shared = REFERENCE.parent / "splits.json"
    if not shared.is_file():
        pytest.skip("shared/splits.json not present")
    published = {k: v for k, v in json.loads(packaged.read_text()).items() if k != "builtin"}  # builtin: this project's own
    assert published == json.loads(shared.read_text())


def test_label_of_and_label_map():
    split = OpenSetSplit("cifar10", (2, 3, 4, 5, 6, 7))
    assert [split.label_of(c) for c in range(10)] == [-1, -1, 0, 1, 2, 3, 4, 5, -1, -1]
    table = split.label_map(10)
    assert table.dtype == np.int64
    assert table.tolist() == [-1, -1, 0, 1, 2, 3, 4, 5, -1, -1]
    assert split.primary_test_classes(10).tolist() == list(range(10))
    with pytest.raises(DataError, match=r"needs class 7, but the 'cifar10' data has 7 classes \(0..6\)"):
        split.label_map(7)


def test_known_order_is_kept():
    split = split_by_name("arpl", "mnist", 0)
    assert split.known == (2, 4, 5, 9, 8, 3)
    assert split.label_of(2) == 0 and split.label_of(3) == 5 and split.label_of(0) == -1


def test_cssr_family():
    split = split_by_name("cssr", "tinyimagenet", "a")
    assert split.num_known == 20 and split.known[:3] == (0, 7, 8) and split.unknown is None
    assert split_by_name("cssr", "svhn", "b").known == split_by_name("cssr", "cifar10", "b").known == (1, 2, 4, 6, 7, 8)


def test_cifar_plus_split_maps_known_and_takes_unknowns_from_cifar100():
    split = split_by_name("arpl", "cifar_plus10", "0")
    assert split.dataset == "cifar10" and split.unknown_dataset == "cifar100"
    assert split.known == (4, 7, 9, 1)
    assert split.unknown == (30, 25, 1, 9, 8, 0, 46, 52, 49, 71)
    assert split.label_map(10).tolist() == [-1, 3, -1, -1, 0, -1, -1, 1, -1, 2]
    # primary test set keeps only the known CIFAR-10 classes; unknowns come from CIFAR-100
    assert split.primary_test_classes(10).tolist() == [1, 4, 7, 9]
    assert len(split_by_name("arpl", "cifar_plus50", 4).unknown) == 50


def test_builtin_family():
    fm = split_by_name("builtin", "fashion_mnist", "default")
    assert fm.known == (0, 1, 2, 3, 4, 5) and fm.unknown == (6, 7, 8, 9)
    assert fm.name == "builtin/fashion_mnist/default"
    assert split_by_name("builtin", "fashion_mnist", "0").known == fm.known
    assert split_by_name("builtin", "mnist", "default").known == split_by_name("arpl", "mnist", "0").known


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_builtin_family_has_five_distinct_6_known_4_unknown_splits(dataset):
    splits = [split_by_name("builtin", dataset, s) for s in valid_split_names("builtin", dataset) if s != "default"]
    assert len(splits) == 5
    knowns = {frozenset(s.known) for s in splits}
    assert len(knowns) == 5  # no split repeats another
    for s in splits:
        assert s.num_known == 6 and set(s.known) <= set(range(10))
        unknown = set(range(10)) - set(s.known) if s.unknown is None else set(s.unknown)
        assert len(unknown) == 4 and not unknown & set(s.known)
        assert s.label_map(10).tolist().count(-1) == 4


def test_builtin_fashion_mnist_splits_are_the_documented_seeded_draws():
    drawn = [sorted(np.random.default_rng(seed).permutation(10)[:6].tolist()) for seed in range(1, 5)]
    assert [list(split_by_name("builtin", "fashion_mnist", i).known) for i in range(1, 5)] == drawn
    assert split_by_name("builtin", "fashion_mnist", 2).known == (0, 2, 5, 6, 7, 9)
    assert split_by_name("builtin", "mnist", 4).known == split_by_name("arpl", "mnist", "4").known


def test_none_family_all_known():
    split = split_by_name("none", "imagenet", "default", num_classes=1000)
    assert split.known == tuple(range(1000)) and split.unknown == ()
    assert split.primary_test_classes(1000).size == 1000
    assert split_by_name("none", "imagefolder", "x", num_classes=3).known == (0, 1, 2)
    for dataset in ("imagefolder", "imagenet"):  # an ImageNet-layout tree of any size counts its classes
        with pytest.raises(DataError, match="class count"):
            split_by_name("none", dataset, "x")


@pytest.mark.parametrize(
    "family,dataset,split,match",
    [
        ("cssr", "cifar10", "z", "valid: a, b, c, d, e"),
        ("cssr", "mnist", "a", "valid: cifar10, svhn, tinyimagenet"),
        ("arpl", "cifar10", "7", "valid: 0, 1, 2, 3, 4"),
        ("arpl", "cifar_plus10", "default", "valid: 0, 1, 2, 3, 4"),
        ("builtin", "cifar10", "default", "valid: fashion_mnist, mnist"),
        ("builtin", "fashion_mnist", "5", "valid: default, 0, 1, 2, 3, 4"),
        ("nope", "cifar10", "a", "valid: builtin, cssr, arpl, none"),
    ],
)
def test_bad_names_give_one_line_with_valid_names(family, dataset, split, match):
    with pytest.raises(DataError, match=match) as err:
        split_by_name(family, dataset, split)
    assert "\n" not in str(err.value)


def test_invalid_split_objects():
    with pytest.raises(DataError, match="both known and unknown"):
        OpenSetSplit("cifar10", (1, 2), unknown=(2, 3))
    with pytest.raises(DataError, match="distinct"):
        OpenSetSplit("cifar10", (1, 1))
    with pytest.raises(DataError, match="no known classes"):
        OpenSetSplit("cifar10", ())


@needs_reference
@pytest.mark.parametrize("dataset,letter", [("cifar10", "a"), ("svhn", "b"), ("tinyimagenet", "a")])
def test_reference_files_equal_cssr_family(dataset, letter):
    split = split_from_reference_file(REFERENCE / f"{dataset}_spl_{letter}.json")
    family = split_by_name("cssr", dataset, letter)
    assert split.dataset == dataset
    assert split.known == family.known
    assert split.unknown is None and split.unknown_dataset is None and split.ood_datasets == ()


@needs_reference
def test_reference_imagenet_vs_inaturalist():
    split = split_from_reference_file(REFERENCE / "imagenet_vs_inaturalist.json")
    assert split.dataset == "imagenet" and split.known == tuple(range(1000))
    assert split.unknown == () and split.ood_datasets == ("oodinaturalist",)


def _write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "spl.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_reference_file_cifar_plus_style(tmp_path):
    convert100 = [-1 if c in (3, 5) else -2 for c in range(100)]
    path = _write(tmp_path, {
        "train": [{"dataset": "cifar10", "convert_class": [-1, 1, -1, 0, -1, -1, -1, -1, -1, -1], "keep_class": [0, 1]}],
        "test": [{"dataset": "cifar10", "convert_class": [-1, 1, -1, 0, -1, -1, -1, -1, -1, -1], "keep_class": [0, 1]},
                 {"dataset": "cifar100", "convert_class": convert100, "keep_class": [-1]}],
    })
    split = split_from_reference_file(path)
    assert split.known == (3, 1) and split.unknown_dataset == "cifar100" and split.unknown == (3, 5)


@pytest.mark.parametrize(
    "content,match",
    [
        ({"train": [{"dataset": "food101", "convert_class": [0], "keep_class": [0]}]}, "unknown dataset 'food101'; valid: cifar10"),
        ({"train": [{"dataset": "cifar10", "convert_class": [0, 0], "keep_class": [0]}]}, "merges original classes"),
        ({"train": [{"dataset": "cifar10", "keep_class": [0]}]}, "malformed"),
        ("{not json", "not valid JSON"),
    ],
)
def test_reference_file_errors(tmp_path, content, match):
    with pytest.raises(DataError, match=match) as err:
        split_from_reference_file(_write(tmp_path, content))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="not found"):
        split_from_reference_file(tmp_path / "missing.json")


def test_resolve_split_precedence(data_cfg, tmp_path):
    path = _write(tmp_path, {"train": [{"dataset": "svhn", "convert_class": [0, 1, -1], "keep_class": [0, 1]}]})
    cfg = data_cfg(dataset="cifar10", split_family="cssr", split="c", known=[1, 2], unknown=[3])
    assert resolve_split(cfg).known == (1, 2) and resolve_split(cfg).unknown == (3,)
    cfg.split_file = str(path)  # a split of svhn with data.dataset cifar10: refused (issue 20), else it wins
    with pytest.raises(DataError, match="is a split of 'svhn', but data.dataset is 'cifar10'"):
        resolve_split(cfg)
    cfg.dataset = "svhn"
    assert resolve_split(cfg).dataset == "svhn" and resolve_split(cfg).known == (0, 1)
    cfg.dataset = "cifar10"
    cfg.split_file, cfg.known, cfg.unknown = None, None, None
    assert resolve_split(cfg).known == (0, 3, 4, 5, 6, 8)
    assert resolve_split(data_cfg()).name == "builtin/fashion_mnist/default"
    with pytest.raises(DataError, match="data.known is empty"):
        resolve_split(data_cfg(unknown=[1]))


# ---------------------------------------------------------------- any ImageNet-layout tree
WNIDS = ["n01440764", "n01443537", "n01484850"]


def _imagenet_tree(root: Path, tiny) -> Path:
    """3 synsets in ImageNet's folder layout: train/<wnid>/ and val/<wnid>/ (4 and 2 images each)."""
    for c, wnid in enumerate(WNIDS):
        tiny.images(root / "train" / wnid, [f"{wnid}_{i}.JPEG" for i in range(4)], seed=10 * c)
        tiny.images(root / "val" / wnid, [f"val_{c}_{i}.JPEG" for i in range(2)], seed=100 + 10 * c)
    return root


def _imagenet_cfg(*overrides: str):
    from cssr_dist.config import load_config

    return load_config(None, ["data.dataset=imagenet", "data.split_family=none", "data.in_chans=3",
                              "data.image_size=16", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
                              "data.num_workers=0", "data.batch_size=4", "data.ood=[]", *overrides]).data


def test_an_imagenet_layout_tree_of_any_size_counts_its_classes_in_folders_and_shards(tmp_path, tiny):
    """data.dataset=imagenet on a 3-class tree: 3 known classes (not 1000), counted from the class
    folders (native) or the shard index (shards); the data set keeps the name the user chose."""
    from cssr_dist.apps.make_shards.cli import main as make_shards
    from cssr_dist.data.readers import build_run_data, known_class_names, run_split

    root = _imagenet_tree(tmp_path / "imagenet", tiny)
    native = _imagenet_cfg(f"data.root={root}")
    split = run_split(native)
    assert (split.dataset, split.known, split.name) == ("imagenet", (0, 1, 2), "none/imagenet")
    assert known_class_names(native) == WNIDS
    data = build_run_data(native, seed=0)
    assert (data.meta.num_classes, data.meta.split.dataset, data.meta.class_names) == (3, "imagenet", WNIDS)
    assert data.meta.counts["test_known"] == 6

    shards = tmp_path / "shards"
    for subset in ("train", "val"):
        assert make_shards(["--source", "imagefolder", "--root", str(root / subset), "--dataset", "imagenet",
                            "--out", str(shards / f"imagenet-{subset}"), "--workers", "1", "--no-progress"]) == 0
    sharded = _imagenet_cfg(f"data.root={shards}", "data.format=shards", "data.shards.train=imagenet-train",
                            "data.shards.test=imagenet-val")
    assert run_split(sharded) == split and known_class_names(sharded) == WNIDS


@pytest.mark.parametrize("overrides, setting", [
    (["data.known=[0,5]"], "list classes in 0..2 in data.known"),
    (["data.split_file={file}"], "drop it (data.split_file=null) or pass one of this data"),
])
def test_an_impossible_split_on_an_imagenet_tree_names_the_setting_to_change(tmp_path, tiny, overrides, setting):
    from cssr_dist.data.readers import build_run_data

    root = _imagenet_tree(tmp_path / "imagenet", tiny)
    file = tmp_path / "spl_a.json"  # a reference split of ImageNet-1k: classes 0..9 known
    convert = [i if i < 10 else -1 for i in range(1000)]
    entry = {"dataset": "imagenet", "convert_class": convert}
    file.write_text(json.dumps({"train": [{**entry, "keep_class": list(range(10))}],
                                "test": [{**entry, "keep_class": [*range(10), -1]}]}))
    cfg = _imagenet_cfg(f"data.root={root}", *[o.format(file=file) for o in overrides])
    with pytest.raises(DataError) as err:
        build_run_data(cfg, seed=0)
    message = str(err.value)
    assert "\n" not in message and "the 'imagenet' data has 3 classes (0..2)" in message, message
    assert message.endswith(setting), message
