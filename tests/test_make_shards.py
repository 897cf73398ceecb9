"""tools/make_shards.py on tiny files of every supported on-disk layout, its options, resume and --verify."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.io
import webdataset as wds

from cssr_dist.apps.make_shards import cli as make_shards_cli
from cssr_dist.apps.make_shards.cli import main, verify_shard_set
from cssr_dist.data.shards.index import read_index
from cssr_dist.apps.make_shards.writer import TAR_OVERHEAD
from cssr_dist.data.readers.shards import iter_shard

REPO = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n01484850"]


def run(*args: str | Path) -> int:
    return main([*map(str, args), "--no-progress", "--workers", "1"])


def read_back(prefix: Path) -> dict[int, dict]:
    """id -> sample (members as bytes) of a whole shard set, checking ids are unique."""
    index, path = read_index(str(prefix))
    out = {}
    for shard in index.shards:
        for sample in iter_shard(str(path.parent / shard.name), lambda u, e: pytest.fail(f"{u}: {e}")):
            sid = int(sample["__key__"])
            assert sid not in out
            out[sid] = sample
    assert sorted(out) == list(range(index.total))
    return out


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(data)))


def jpeg(path: Path, color: int, size: tuple[int, int] = (30, 20), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(color)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    PIL.Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path, quality=95)
    return path


# ---------------------------------------------------------------- torchvision-format files
def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(str(path) + ".gz", "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def write_torchvision(root: Path, name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Training split of `name` in its official on-disk format; returns (images, labels)."""
    if name in ("mnist", "fashion_mnist"):
        images, labels = rng.integers(0, 255, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7)
        folder = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
        for prefix in ("train", "t10k"):
            write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
            write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
        return images, labels
    if name == "svhn":
        images, labels = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8), np.array([10, 1, 2, 10, 4, 5])
        root.mkdir(parents=True)
        scipy.io.savemat(root / "train_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": labels[:, None]})
        return images, np.where(labels == 10, 0, labels)
    ten = name == "cifar10"
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True)
    images = rng.integers(0, 255, (10 if ten else 4, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10 if ten else 100, len(images))
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    key = "labels" if ten else "fine_labels"
    batches = [(f"data_batch_{i + 1}", slice(2 * i, 2 * i + 2)) for i in range(5)] if ten else [("train", slice(None))]
    for file, part in batches:
        with open(folder / file, "wb") as fh:
            pickle.dump({"data": flat[part], key: labels[part].tolist()}, fh)
    names = {"label_names": [f"c{i}" for i in range(10)]} if ten else \
        {"fine_label_names": [f"f{i}" for i in range(100)]}
    with open(folder / ("batches.meta" if ten else "meta"), "wb") as fh:
        pickle.dump(names, fh)
    return images, labels


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist", "fashion_mnist"])
def test_torchvision_formats_are_stored_losslessly(tmp_path, name):
    images, labels = write_torchvision(tmp_path / "raw", name, np.random.default_rng(1))
    prefix = tmp_path / "out" / name
    assert run("--source", "torchvision", "--dataset", name, "--root", tmp_path / "raw", "--out", prefix,
               "--samples-per-shard", "3", "--verify") == 0
    index, _ = read_index(str(prefix))
    assert index.total == len(images) and len(index.shards) == -(-len(images) // 3)
    assert index.image_encoding["encoding"] == "png" and index.image_mode == ("L" if "mnist" in name else "RGB")
    assert index.class_counts == np.bincount(labels, minlength=len(index.classes)).tolist()
    assert "--dataset " + name in index.made_with["command"]
    for sample in read_back(prefix).values():
        source_index = int(sample["txt"].decode().rsplit("/", 1)[1])
        assert int(sample["cls"]) == labels[source_index]
        assert np.array_equal(pixels(sample["png"]), images[source_index])  # PNG: lossless


# ---------------------------------------------------------------- ImageFolder / flat / Tiny-ImageNet / OOD / list
def imagenet_train(root: Path) -> Path:
    for c, wnid in enumerate(WNIDS):
        for i in range(4):
            jpeg(root / wnid / f"{wnid}_{i}.JPEG", 10 * c + i)
    return root


def test_imagefolder_keeps_original_bytes_names_and_class_mixed_order(tmp_path):
    train = imagenet_train(tmp_path / "train")
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\nn01484850 great white shark\n")
    prefix = tmp_path / "out" / "imagenet-train"
    assert run("--source", "imagefolder", "--root", train, "--out", prefix, "--dataset", "imagenet",
               "--class-names", names, "--samples-per-shard", "5") == 0
    index, _ = read_index(str(prefix))
    assert index.wnids == WNIDS and index.classes == ["tench, Tinca tinca", "goldfish", "great white shark"]
    assert index.dataset == "imagenet" and [s.samples for s in index.shards] == [5, 5, 2]
    samples = read_back(prefix)
    for sample in samples.values():
        rel = sample["txt"].decode()
        assert sample["jpg"] == (train / rel).read_bytes()  # no re-encode
        assert int(sample["cls"]) == WNIDS.index(rel.split("/")[0])
    first_shard = [int(samples[i]["cls"]) for i in range(5)]
    assert len(set(first_shard)) > 1  # shuffled before writing: shards mix classes
    sorted_prefix = tmp_path / "out" / "sorted"
    assert run("--source", "imagefolder", "--root", train, "--out", sorted_prefix, "--no-shuffle") == 0
    assert [int(s["cls"]) for _, s in sorted(read_back(sorted_prefix).items())] == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize("fmt", ["ilsvrc-gt-text", "ilsvrc-gt-meta.mat", "loc-csv", "filename-wnid"])
def test_imagenet_val_flat_layout_with_each_label_file(tmp_path, fmt):
    imagenet_train(tmp_path / "train")
    assert run("--source", "imagefolder", "--root", tmp_path / "train", "--out", tmp_path / "tr") == 0
    val = tmp_path / "val"
    truth = [2, 0, 1, 1, 2, 0]  # class positions in sorted-wnid order
    files = [jpeg(val / f"ILSVRC2012_val_{i + 1:08d}.JPEG", 100 + i) for i in range(len(truth))]
    ilsvrc_id = {"n01484850": 1, "n01440764": 2, "n01443537": 3}  # devkit ids are NOT sorted-wnid order
    extra = []
    if fmt.startswith("ilsvrc-gt"):
        labels = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
        labels.write_text("".join(f"{ilsvrc_id[WNIDS[t]]}\n" for t in truth))
        if fmt.endswith("text"):
            (tmp_path / "ids.txt").write_text("".join(f"{i} {w}\n" for w, i in ilsvrc_id.items()))
            extra = ["--id-map", tmp_path / "ids.txt"]
        else:
            rows = [(i, w, "words", "gloss", 0) for w, i in ilsvrc_id.items()] + [(1001, "n00001740", "entity", "", 3)]
            dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
            scipy.io.savemat(tmp_path / "meta.mat", {"synsets": np.array(rows, dtype=dtype)})
            extra = ["--id-map", tmp_path / "meta.mat"]
    elif fmt == "loc-csv":
        labels = tmp_path / "LOC_val_solution.csv"
        labels.write_text("ImageId,PredictionString\n" + "".join(
            f"{f.stem},{WNIDS[t]} 1 2 3 4 {WNIDS[t]} 5 6 7 8\n" for f, t in reversed(list(zip(files, truth)))))
    else:
        labels = tmp_path / "val_labels.txt"
        labels.write_text("".join(f"{f.name}\t{WNIDS[t]}\t0\t0\t9\t9\n" for f, t in zip(files, truth)))
    prefix = tmp_path / "va"
    assert run("--source", "flat", "--root", val, "--labels", labels, *extra, "--classes-from", tmp_path / "tr.json",
               "--out", prefix, "--verify") == 0
    by_name = {s["txt"].decode(): int(s["cls"]) for s in read_back(prefix).values()}
    assert by_name == {f.name: t for f, t in zip(files, truth)}
    assert read_index(str(prefix))[0].wnids == WNIDS


def test_ilsvrc_ground_truth_without_the_devkit_map_is_refused(tmp_path, capsys):
    jpeg(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", 1)
    (tmp_path / "gt.txt").write_text("1\n")
    assert run("--source", "flat", "--root", tmp_path / "val", "--labels", tmp_path / "gt.txt",
               "--out", tmp_path / "va") == 2
    assert "not sorted-wnid positions; pass --id-map" in capsys.readouterr().err


def test_tinyimagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    for c, wnid in enumerate(WNIDS):
        for i in range(2):
            jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", c * 5 + i, (8, 8))
    (root / "words.txt").write_text("".join(f"{w}\tthing {c}\n" for c, w in enumerate(WNIDS)) + "n09999999\tother\n")
    notes = []
    for i, c in enumerate([1, 2, 0, 2]):
        jpeg(root / "val" / "images" / f"val_{i}.JPEG", 50 + i, (8, 8))
        notes.append(f"val_{i}.JPEG\t{WNIDS[c]}\t0\t0\t7\t7\n")
    (root / "val" / "val_annotations.txt").write_text("".join(notes))
    assert run("--source", "tinyimagenet", "--root", root, "--subset", "train", "--out", tmp_path / "t") == 0
    assert run("--source", "tinyimagenet", "--root", root, "--subset", "val", "--out", tmp_path / "v") == 0
    train, val = read_index(str(tmp_path / "t"))[0], read_index(str(tmp_path / "v"))[0]
    assert train.classes == val.classes == ["thing 0", "thing 1", "thing 2"] and train.wnids == WNIDS
    assert train.class_counts == [2, 2, 2] and val.class_counts == [1, 1, 2]
    assert {s["txt"].decode(): int(s["cls"]) for s in read_back(tmp_path / "v").values()} == \
        {"val_0.JPEG": 1, "val_1.JPEG": 2, "val_2.JPEG": 0, "val_3.JPEG": 2}


def test_ood_folder_and_file_list(tmp_path):
    for i, sub in enumerate(["a", "a/b", "c"]):
        jpeg(tmp_path / "inat" / sub / f"{i}.jpg", i)
    jpeg(tmp_path / "inat" / "grey.jpg", 9, mode="L")
    assert run("--source", "ood", "--root", tmp_path / "inat", "--dataset", "inaturalist", "--out", tmp_path / "o") == 0
    ood, _ = read_index(str(tmp_path / "o"))
    assert ood.classes == [] and ood.unknown_count == 4 and ood.total == 4 and ood.dataset == "inaturalist"
    assert {int(s["cls"]) for s in read_back(tmp_path / "o").values()} == {-1}

    files = [jpeg(tmp_path / "pics" / f"my pic {i}.jpg", i) for i in range(5)]
    (tmp_path / "list.txt").write_text("".join(f"pics/{f.name} {i % 3}\n" for i, f in enumerate(files)))
    assert run("--source", "filelist", "--list", tmp_path / "list.txt", "--root", tmp_path, "--out", tmp_path / "l",
               "--verify") == 0
    listed, _ = read_index(str(tmp_path / "l"))
    assert listed.classes == ["0", "1", "2"] and listed.class_counts == [2, 2, 1]
    assert {s["txt"].decode(): int(s["cls"]) for s in read_back(tmp_path / "l").values()} == \
        {f"pics/{f.name}": i % 3 for i, f in enumerate(files)}


def _error_line(capsys) -> str:
    """The one line a refused make_shards printed (no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_openood_image_lists(tmp_path, capsys):
    """OpenOOD v1.5's benchmark_imglist lines as published (`<set>/<...>/<file> <label>`, -1 for OOD,
    sorted-wnid positions for ImageNet-1k), paths relative to images_largescale/."""
    images = tmp_path / "images_largescale"
    ood = ["ssb_hard/n11622368/n11622368_1063.JPEG", "ssb_hard/n11622368/n11622368_1120.JPEG",
           "ssb_hard/n01575401/n01575401_10029.JPEG"]
    for i, rel in enumerate(ood):
        jpeg(images / rel, i)
    lists = tmp_path / "benchmark_imglist" / "imagenet"
    lists.mkdir(parents=True)
    (lists / "test_ssb_hard.txt").write_text("".join(f"{rel} -1\n" for rel in ood))
    # the published size is checked first: 3 lines are not OpenOOD v1.5's 49,000
    common = ["--source", "filelist", "--root", images, "--list", lists / "test_ssb_hard.txt", "--dataset", "ssb_hard",
              "--subset", "ood", "--out", tmp_path / "ood-ssb_hard"]
    assert run(*common) == 2
    line = _error_line(capsys)
    assert "test_ssb_hard.txt has 3 'path label' lines, expected 49000" in line and "--expect-lines" in line
    assert not (tmp_path / "ood-ssb_hard.json").exists()
    assert run(*common, "--expect-lines", "3", "--verify") == 0
    assert f"{lists / 'test_ssb_hard.txt'}: 3 lines, as expected (--expect-lines)" in capsys.readouterr().out
    index, _ = read_index(str(tmp_path / "ood-ssb_hard"))
    assert index.total == index.unknown_count == 3 and index.classes == []
    assert sorted(s["txt"].decode() for s in read_back(tmp_path / "ood-ssb_hard").values()) == sorted(ood)

    # the ID test list: labels index the training classes (sorted wnids), taken --classes-from its index
    for c, wnid in enumerate(WNIDS):
        jpeg(tmp_path / "train" / wnid / "a.JPEG", 10 + c)
    assert run("--source", "imagefolder", "--root", tmp_path / "train", "--out", tmp_path / "imagenet-train") == 0
    val = [("imagenet_1k/val/ILSVRC2012_val_00000001.JPEG", 2), ("imagenet_1k/val/ILSVRC2012_val_00000002.JPEG", 0)]
    for i, (rel, _) in enumerate(val):
        jpeg(images / rel, 20 + i)
    (lists / "test_imagenet.txt").write_text("".join(f"{rel} {label}\n" for rel, label in val))
    assert run("--source", "filelist", "--root", images, "--list", lists / "test_imagenet.txt", "--expect-lines", "2",
               "--classes-from", tmp_path / "imagenet-train.json", "--subset", "test",
               "--out", tmp_path / "imagenet-test") == 0
    test, train = read_index(str(tmp_path / "imagenet-test"))[0], read_index(str(tmp_path / "imagenet-train"))[0]
    assert test.wnids == train.wnids == WNIDS and test.class_counts == [1, 0, 1]
    assert {s["txt"].decode(): int(s["cls"]) for s in read_back(tmp_path / "imagenet-test").values()} == dict(val)


@pytest.mark.parametrize("bad, says", [
    ("imagenet_1k/val/ILSVRC2012_val_00000003.JPEG n01440764", "expected 'path label'"),
    ("imagenet_1k/val/ILSVRC2012_val_00000003.JPEG", "expected 'path label'"),
    ("imagenet_1k/val/ILSVRC2012_val_00000003.JPEG {'label': 3}", "expected 'path label'"),
    ("../../etc/passwd -1", "must be relative to --root and stay below it"),
    ("/etc/passwd -1", "must be relative to --root and stay below it"),
    ("imagenet_1k/val/ILSVRC2012_val_00000003.JPEG -2", "label -2"),
    ("imagenet_1k/val/ILSVRC2012_val_00000003.JPEG 3", "label 3, but --classes-from"),
])
def test_a_bad_list_line_is_named_by_file_and_line(tmp_path, capsys, bad, says):
    for c, wnid in enumerate(WNIDS):
        jpeg(tmp_path / "train" / wnid / "a.JPEG", c)
    assert run("--source", "imagefolder", "--root", tmp_path / "train", "--out", tmp_path / "tr") == 0
    jpeg(tmp_path / "imagenet_1k" / "val" / "ILSVRC2012_val_00000001.JPEG", 5)
    listed = tmp_path / "my_list.txt"  # line 2 blank: numbers count every line of the file
    listed.write_text(f"imagenet_1k/val/ILSVRC2012_val_00000001.JPEG 0\n\n{bad}\n")
    capsys.readouterr()
    assert run("--source", "filelist", "--root", tmp_path, "--list", listed, "--classes-from", tmp_path / "tr.json",
               "--out", tmp_path / "out") == 2
    line = _error_line(capsys)
    assert f"{listed}:3: " in line and says in line, line


# ---------------------------------------------------------------- options
def test_bytes_per_shard_and_resize(tmp_path):
    root = tmp_path / "big"
    for i in range(6):
        jpeg(root / "a" / f"{i}.jpg", i, (60, 40) if i % 2 else (10, 12))
    size = max(p.stat().st_size for p in (root / "a").iterdir())
    limit = 2 * size + 4000
    assert run("--source", "imagefolder", "--root", root, "--out", tmp_path / "b", "--max-bytes", str(limit),
               "--encoding", "original") == 0
    index, _ = read_index(str(tmp_path / "b"))
    samples = read_back(tmp_path / "b")
    cost = [(root / samples[i]["txt"].decode()).stat().st_size + TAR_OVERHEAD for i in range(6)]
    starts = np.cumsum([0] + [s.samples for s in index.shards])
    assert len(index.shards) > 1
    for a, b in zip(starts[:-1], starts[1:]):
        assert sum(cost[a:b]) <= limit  # within the byte budget ...
        assert b == 6 or sum(cost[a:b + 1]) > limit  # ... and filled greedily
    assert run("--source", "imagefolder", "--root", root, "--out", tmp_path / "r", "--resize", "16",
               "--quality", "50") == 0
    index, _ = read_index(str(tmp_path / "r"))
    assert index.image_encoding == {"encoding": "jpeg", "resize_shorter_side": 16, "quality": 50}
    for sample in read_back(tmp_path / "r").values():
        image = PIL.Image.open(io.BytesIO(sample["jpg"]))
        with PIL.Image.open(root / sample["txt"].decode()) as original:
            assert image.format == "JPEG"
            assert min(image.size) == min(16, min(original.size))  # shrink only, never enlarge


def test_parallel_workers_write_the_same_bytes_and_resume_skips_finished_shards(tmp_path, monkeypatch, capsys):
    train = imagenet_train(tmp_path / "train")
    base = ["--source", "imagefolder", "--root", str(train), "--samples-per-shard", "2", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert main([*base, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    for i in range(6):
        assert (tmp_path / f"one-{i:06d}.tar").read_bytes() == (tmp_path / f"two-{i:06d}.tar").read_bytes()

    calls = []
    real = make_shards_cli._write_task

    def dies_after_two(task):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job was killed
        calls.append(task[0])
        return real(task)

    monkeypatch.setattr(make_shards_cli, "_write_task", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        main([*base, "--out", str(tmp_path / "res"), "--workers", "1"])
    done = sorted(tmp_path.glob("res-*.tar"))
    assert len(done) == 2 and not (tmp_path / "res.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in done}
    monkeypatch.setattr(make_shards_cli, "_write_task", real)
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "res"), "--workers", "1"]) == 0
    assert f"resuming {tmp_path / 'res'}: 2 of 6 shards were written by an earlier run of the same plan and are " \
           "kept; writing the other 4" in capsys.readouterr().out  # the user is told it resumed
    assert {p: p.stat().st_mtime_ns for p in done} == stamps  # finished shards were not rewritten
    index, _ = read_index(str(tmp_path / "res"))
    assert index.made_with["resumed_shards"] == 2 and verify_shard_set(tmp_path / "res") == []
    assert (tmp_path / "res-000005.tar").read_bytes() == (tmp_path / "one-000005.tar").read_bytes()
    # a different plan over the same prefix is refused, unless --overwrite
    assert main([*base[:-1], "--out", str(tmp_path / "res"), "--samples-per-shard", "3", "--no-progress"]) == 2
    assert main([*base, "--out", str(tmp_path / "res"), "--samples-per-shard", "3", "--overwrite"]) == 0
    assert len(read_index(str(tmp_path / "res"))[0].shards) == 4 and not list(tmp_path.glob("res-00000[45].tar"))


def test_skipped_files_are_counted_with_their_reason(tmp_path, capsys):
    """Non-images, hidden entries and stray files beside the class folders are left out, and the
    user is told how many and why (before: dropped uncounted); the index records the counts."""
    train = imagenet_train(tmp_path / "train")
    (train / WNIDS[0] / "readme.txt").write_text("x")
    (train / WNIDS[1] / "boxes.xml").write_text("x")
    (train / WNIDS[1] / ".DS_Store").write_text("x")
    (train / "LICENSE").write_text("x")
    assert run("--source", "imagefolder", "--root", train, "--out", tmp_path / "s", "--no-progress") == 0
    out = capsys.readouterr().out
    assert f"listed 12 images under {train}; skipped 4 entries: 2 not images by suffix (.jpg" in out, out
    assert f"(e.g. {train / WNIDS[0] / 'readme.txt'}), 1 files outside the class folders (e.g. {train / 'LICENSE'})" \
           in out and f"1 hidden (e.g. {train / WNIDS[1] / '.DS_Store'})" in out, out
    skipped = read_index(str(tmp_path / "s"))[0].made_with["skipped_files"]
    assert sorted(skipped.values()) == [1, 1, 2] and read_index(str(tmp_path / "s"))[0].total == 12
    ood = tmp_path / "ood"
    jpeg(ood / "a.jpg", 1)
    (ood / "notes.pdf").write_text("x")
    assert run("--source", "ood", "--root", ood, "--out", tmp_path / "o", "--no-progress") == 0
    assert "listed 1 images" in capsys.readouterr().out
    clean = imagenet_train(tmp_path / "clean")
    assert run("--source", "imagefolder", "--root", clean, "--out", tmp_path / "c", "--no-progress") == 0
    assert "listed" not in capsys.readouterr().out  # nothing left out: no line


# ---------------------------------------------------------------- --verify
def _truncated_jpeg(sample: dict) -> dict:
    return {**sample, "jpg": sample["jpg"][: len(sample["jpg"]) // 2]}


CORRUPTIONS = {
    "truncated-jpeg": (_truncated_jpeg, "image does not decode"),
    "missing-cls": (lambda s: {k: v for k, v in s.items() if k != "cls"}, "no .cls label"),
    "non-image": (lambda s: {**s, "jpg": b"<html>404</html>"}, "image does not decode"),
    "pickle": (lambda s: {**s, "pyd": pickle.dumps({"x": 1})}, "has a '.pyd' member"),
    "truncated-tar": (None, "unreadable tar"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_verify_catches_each_kind_of_corruption(tmp_path, kind, capsys):
    train = imagenet_train(tmp_path / "train")
    assert run("--source", "imagefolder", "--root", train, "--out", tmp_path / "s", "--samples-per-shard", "4") == 0
    assert run("--verify-only", tmp_path / "s") == 0
    shard = tmp_path / "s-000001.tar"
    edit, message = CORRUPTIONS[kind]
    if edit is None:
        shard.write_bytes(shard.read_bytes()[:3000])
    else:
        samples = list(iter_shard(str(shard), lambda u, e: None))
        with open(shard, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False)
            for i, sample in enumerate(samples):
                sample = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
                writer.write(edit(sample) if i == 1 else sample)
            writer.close()
    capsys.readouterr()
    assert run("--verify-only", tmp_path / "s") == 1
    out = capsys.readouterr()
    assert message in out.err and "s-000001.tar" in out.err and "FAILED" in out.out


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert run("--source", "imagefolder", "--root", tmp_path / "missing", "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ImageFolder folder not found" in err
    assert run("--source", "torchvision", "--root", tmp_path, "--out", tmp_path / "x") == 2
    assert "needs --dataset" in capsys.readouterr().err


def test_tool_script_is_a_thin_wrapper_of_the_installed_package(tmp_path):
    """tools/make_shards.py patches no sys.path: it imports the package as installed (`pip install -e .`
    puts the checkout on the path; PYTHONPATH stands in for it here, the shared venv's install being another)."""
    jpeg(tmp_path / "ood" / "x.jpg", 3)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), "--source", "ood", "--root",
                             str(tmp_path / "ood"), "--out", str(tmp_path / "o"), "--no-progress"],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "o.json").read_text())["total"] == 1
