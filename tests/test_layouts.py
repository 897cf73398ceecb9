"""One listing per on-disk layout (data/layouts.py): the native reader and make_shards see the
same images in the same order, under one policy for hidden files, symlinks and nested folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from cssr_dist.apps.make_shards.cli import build_parser, listing_from_args
from cssr_dist.data import layouts
from cssr_dist.data.sources import build_source


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)


@pytest.fixture
def awkward_tree(tmp_path: Path) -> Path:
    """Class folders with nested folders, hidden files and folders, links to files and folders,
    a link loop, a broken link and names whose string order differs from Path order."""
    outside = tmp_path / "outside"
    _image(outside / "linked_dir" / "z.png")
    _image(outside / "linked_file.png")
    root = tmp_path / "tree"
    for name in ["cat/a.png", "cat/a-c.png", "cat/a/b.png", "cat/deep/er/x.JPG", "dog/1.jpeg", "dog/B.png",
                 "dog/.hidden.png", "dog/._resource.jpg", "dog/.cache/in_hidden.png", ".hidden_class/h.png"]:
        _image(root / name)
    (root / "cat" / "notes.txt").write_text("not an image")
    os.symlink(outside / "linked_dir", root / "cat" / "via_link")
    os.symlink(outside / "linked_file.png", root / "dog" / "link.png")
    os.symlink(root / "cat", root / "cat" / "loop")  # a link to its own folder: walked once, not forever
    os.symlink(root / "missing.png", root / "dog" / "broken.png")
    return root


EXPECTED = ["cat/a-c.png", "cat/a.png", "cat/a/b.png", "cat/deep/er/x.JPG", "cat/via_link/z.png",
            "dog/1.jpeg", "dog/B.png", "dog/link.png"]


def test_policy_on_an_awkward_tree(awkward_tree):
    listing = layouts.list_imagefolder(awkward_tree, "t", "train")
    assert listing.classes == ["cat", "dog"]  # the hidden class folder is not a class
    assert [r.name for r in listing.records] == EXPECTED
    assert [r.label for r in listing.records] == [0, 0, 0, 0, 0, 1, 1, 1]


def test_native_source_and_make_shards_listing_agree(awkward_tree):
    native = build_source("imagefolder", awkward_tree, train=True)
    shards = listing_from_args(build_parser().parse_args(["--source", "imagefolder", "--root", str(awkward_tree), "--out", "x"]))
    assert native.paths == [str(r.ref) for r in shards.records]
    assert [Path(p).relative_to(awkward_tree).as_posix() for p in native.paths] == EXPECTED
    assert native.targets.tolist() == [r.label for r in shards.records]
    assert native.classes == shards.classes


def test_ood_folder_both_ways(awkward_tree):
    native = build_source("oodfolder", awkward_tree, train=False)
    shards = listing_from_args(build_parser().parse_args(["--source", "ood", "--root", str(awkward_tree), "--out", "x"]))
    assert native.paths == [str(r.ref) for r in shards.records]
    assert [Path(p).relative_to(awkward_tree).as_posix() for p in native.paths] == EXPECTED
    assert set(native.targets.tolist()) == {-1} and {r.label for r in shards.records} == {-1}


def test_tinyimagenet_both_ways(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n00000002", "n00000001"]
    for w in wnids:
        _image(base / "train" / w / "images" / f"{w}_0.JPEG")
        _image(base / "train" / w / "images" / f".{w}_hidden.JPEG")
    notes = []
    for i, w in enumerate(["n00000001", "n00000002", "n00000001"]):
        _image(base / "val" / "images" / f"val_{2 - i}.JPEG")
        notes.append(f"val_{2 - i}.JPEG\t{w}\t0\t0\t4\t4")
    _image(base / "val" / "images" / ".DS_Store.png")
    (base / "val" / "val_annotations.txt").write_text("\n".join(notes) + "\n")
    for subset, train in (("train", True), ("val", False)):
        native = build_source("tinyimagenet", tmp_path, train=train)
        shards = listing_from_args(build_parser().parse_args(["--source", "tinyimagenet", "--root", str(base), "--subset", subset,
                                               "--out", "x"]))
        assert native.paths == [str(r.ref) for r in shards.records]
        assert native.targets.tolist() == [r.label for r in shards.records]
        assert native.classes == sorted(wnids)
    assert [Path(p).name for p in native.paths] == ["val_0.JPEG", "val_1.JPEG", "val_2.JPEG"]
    assert native.targets.tolist() == [0, 1, 0]
