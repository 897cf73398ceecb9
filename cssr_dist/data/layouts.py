"""What goes into a shard set: lists of (file or index, label, name) from on-disk layouts.

Each `list_*` function turns one on-disk layout into a `Listing` (class names, optional
WordNet ids, records sorted by name so the same tree always gives the same plan):

* torchvision-format sets (CIFAR-10/100, SVHN, MNIST, Fashion-MNIST) via `build_source`
* ImageFolder trees (ImageNet train: `<root>/<wnid>/*.JPEG`; any depth below a class)
* flat folders with a label file (ImageNet val; Tiny-ImageNet val) - see `read_flat_labels`
* OOD image folders (label -1, any depth)
* plain file lists (`path label` lines)
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import DataError
from .writer import Record

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WNID = re.compile(r"^n\d{8}$")
LABEL_FORMATS = ("auto", "ilsvrc-gt", "loc-csv", "filename-wnid")


@dataclass
class Listing:
    dataset: str
    subset: str
    kind: str
    root: str
    classes: list[str]
    records: list[Record]
    wnids: list[str] | None = None
    image_mode: str = "RGB"
    # for in-memory sources: how a worker rebuilds the data set (name, root, train)
    memory_source: tuple[str, str, bool] | None = None
    notes: dict = field(default_factory=dict)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """All images below `folder`, sorted by relative path (symlinks followed)."""
    found = [Path(d) / f for d, _, files in os.walk(folder, followlinks=True) for f in files]
    return sorted((p for p in found if _is_image(p)), key=lambda p: p.relative_to(folder).as_posix())


def _require_dir(root: str | Path, what: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"{what} folder not found: {path}; pass an existing --root")
    return path


def read_class_names(path: str | Path | None, keys: list[str]) -> list[str]:
    """Readable names: a `key name...` mapping (LOC_synset_mapping.txt, words.txt) or one name a line."""
    if path is None:
        return list(keys)
    lines = [ln.rstrip("\n") for ln in Path(path).read_text().splitlines() if ln.strip()]
    mapping = {}
    for line in lines:
        parts = line.split(None, 1)
        if len(parts) == 2:
            mapping[parts[0]] = parts[1].strip()
    if keys and all(k in mapping for k in keys):
        return [mapping[k] for k in keys]
    if len(lines) == len(keys):
        return [ln.strip() for ln in lines]
    raise DataError(f"--class-names {path}: neither a 'key name' mapping covering all {len(keys)} classes "
                    f"nor one name per class ({len(lines)} lines)")


def list_imagefolder(root: str | Path, dataset: str, subset: str, class_names: str | None = None) -> Listing:
    """ImageFolder layout: one sub-folder per class, sorted names give labels 0..K-1."""
    base = _require_dir(root, "ImageFolder")
    keys = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not keys:
        raise DataError(f"{base} has no class sub-folders; an ImageFolder root holds one folder per class")
    records = []
    for label, key in enumerate(keys):
        for path in image_files(base / key):
            records.append(Record(str(path), label, path.relative_to(base).as_posix()))
    if not records:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) below {base}")
    wnids = keys if all(WNID.match(k) for k in keys) else None
    return Listing(dataset, subset, "imagefolder", str(base), read_class_names(class_names, keys), records, wnids)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def read_id_map(path: str | Path) -> dict[int, str]:
    """ILSVRC2012 id (1-based) -> wnid, from the devkit's meta.mat or an `id wnid` text file.

    The ids in ILSVRC2012_validation_ground_truth.txt are NOT positions in sorted-wnid
    order; only the devkit knows them (id 1 is n02119789, not n01440764).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ILSVRC id map not found: {path}; pass the devkit's data/meta.mat or an 'id wnid' file")
    if path.suffix == ".mat":
        import scipy.io

        synsets = scipy.io.loadmat(str(path), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    out = {}
    for line in _read_lines(path):
        ident, wnid = line.split()[:2]
        out[int(ident)] = wnid
    return out


def detect_label_format(path: Path) -> str:
    if path.suffix.lower() == ".csv":
        return "loc-csv"
    first = _read_lines(path)[0]
    return "ilsvrc-gt" if re.fullmatch(r"\d+", first) else "filename-wnid"


def read_flat_labels(label_file: str | Path, files: list[Path], fmt: str = "auto",
                     id_map: str | Path | None = None) -> dict[str, str]:
    """Map each image's stem (file name without extension) to its wnid.

    Accepted label files (`fmt`):
      ilsvrc-gt      ILSVRC2012_validation_ground_truth.txt: one 1-based ILSVRC id per line,
                     line i belongs to the i-th file in sorted name order; needs `id_map`.
      loc-csv        LOC_val_solution.csv (Kaggle): `ImageId,PredictionString`, first token = wnid.
      filename-wnid  `name wnid [more columns]` lines (Tiny-ImageNet val_annotations.txt, valprep lists).
    """
    path = Path(label_file)
    fmt = detect_label_format(path) if fmt == "auto" else fmt
    if fmt not in LABEL_FORMATS:
        raise DataError(f"--label-format {fmt!r} unknown; choose one of {', '.join(LABEL_FORMATS)}")
    if fmt == "ilsvrc-gt":
        if id_map is None:
            raise DataError(f"{path} holds ILSVRC ids, which are not sorted-wnid positions; pass --id-map "
                            "ILSVRC2012_devkit_t12/data/meta.mat (or an 'id wnid' text file)")
        ids, mapping = _read_lines(path), read_id_map(id_map)
        if len(ids) != len(files):
            raise DataError(f"{path} has {len(ids)} lines but the folder has {len(files)} images; they must match")
        try:
            return {f.stem: mapping[int(i)] for f, i in zip(files, ids)}
        except KeyError as err:
            raise DataError(f"ILSVRC id {err} of {path} is not in the id map {id_map}") from None
    if fmt == "loc-csv":
        with open(path, newline="") as stream:
            rows = list(csv.reader(stream))
        start = 1 if rows and rows[0] and rows[0][0] == "ImageId" else 0
        return {Path(r[0]).stem: r[1].split()[0] for r in rows[start:] if len(r) >= 2 and r[1].strip()}
    return {Path(ln.split()[0]).stem: ln.split()[1] for ln in _read_lines(path)}


def read_class_order(spec: str | Path | None, found: list[str]) -> list[str]:
    """Class (wnid) order: from a shard index, a folder of class folders, a list file, or sorted found."""
    if spec is None:
        return sorted(set(found))
    path = Path(spec)
    if path.is_dir():
        return sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return list(data.get("wnids") or data["classes"])
    return [ln.split()[0] for ln in _read_lines(path)]


def list_flat(root: str | Path, label_file: str | Path, dataset: str, subset: str, fmt: str = "auto",
              id_map: str | Path | None = None, classes_from: str | Path | None = None,
              class_names: str | None = None) -> Listing:
    """Flat folder of images + label file (ImageNet val, Tiny-ImageNet val/images)."""
    base = _require_dir(root, "flat image")
    files = image_files(base)
    if not files:
        raise DataError(f"no images below {base}")
    by_stem = read_flat_labels(label_file, files, fmt, id_map)
    order = read_class_order(classes_from, list(by_stem.values()))
    position = {w: i for i, w in enumerate(order)}
    records, missing = [], []
    for path in files:
        wnid = by_stem.get(path.stem)
        if wnid is None:
            missing.append(path.name)
            continue
        if wnid not in position:
            raise DataError(f"{path.name} has class {wnid}, which is not in the class order ({classes_from}); "
                            "pass --classes-from the matching train folder or index")
        records.append(Record(str(path), position[wnid], path.relative_to(base).as_posix()))
    if missing:
        raise DataError(f"{len(missing)} images in {base} have no label in {label_file} (e.g. {missing[0]})")
    wnids = order if all(WNID.match(w) for w in order) else None
    return Listing(dataset, subset, "flat", str(base), read_class_names(class_names, order), records, wnids)


def list_tinyimagenet(root: str | Path, subset: str) -> Listing:
    """tiny-imagenet-200: train/<wnid>/images/*.JPEG; val/images + val/val_annotations.txt."""
    base = _require_dir(root, "Tiny-ImageNet")
    words = base / "words.txt"
    names = str(words) if words.is_file() else None
    if subset == "train":
        listing = list_imagefolder(base / "train", "tinyimagenet", "train", names)
    elif subset in ("val", "test"):
        listing = list_flat(base / "val" / "images", base / "val" / "val_annotations.txt", "tinyimagenet",
                            subset, "filename-wnid", classes_from=base / "train", class_names=names)
    else:
        raise DataError(f"Tiny-ImageNet subset {subset!r} unknown; use train or val")
    listing.kind = "tinyimagenet"
    return listing


def list_ood(root: str | Path, dataset: str) -> Listing:
    """Unknown-only image folder (iNaturalist, SUN, Places, Textures, OpenImage-O, SSB-hard, NINCO)."""
    base = _require_dir(root, "OOD image")
    files = image_files(base)
    if not files:
        raise DataError(f"no images below OOD folder {base}")
    records = [Record(str(p), -1, p.relative_to(base).as_posix()) for p in files]
    return Listing(dataset, "ood", "ood", str(base), [], records)


def list_filelist(list_file: str | Path, root: str | Path | None, dataset: str, subset: str,
                  class_names: str | None = None) -> Listing:
    """`path label` lines (path relative to `root`, may contain spaces; label int, -1 = unknown)."""
    path = Path(list_file)
    base = Path(root) if root else path.parent
    records = []
    for number, line in enumerate(_read_lines(path), 1):
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise DataError(f"{path}:{number}: expected 'path label', got {line!r}")
        file = base / parts[0]
        records.append(Record(str(file), int(parts[1]), parts[0]))
    if not records:
        raise DataError(f"file list {path} is empty")
    missing = [r.ref for r in records if not Path(r.ref).is_file()]
    if missing:
        raise DataError(f"{len(missing)} files of {path} do not exist (e.g. {missing[0]}); paths are relative "
                        f"to --root {base}")
    records.sort(key=lambda r: r.name)
    num = max(r.label for r in records) + 1
    if any(r.label < -1 for r in records):
        raise DataError(f"{path}: labels must be >= -1")
    return Listing(dataset, subset, "filelist", str(base), read_class_names(class_names, [str(i) for i in range(num)]),
                   records)


def list_torchvision(name: str, root: str | Path, train: bool) -> Listing:
    """A torchvision-format set through the project's `build_source` (images re-encoded as PNG)."""
    from ..sources import build_source

    source = build_source(name, str(root), train)
    targets = [int(t) for t in source.targets]
    subset = "train" if train else "test"
    records = [Record(i, t, f"{name}/{subset}/{i}") for i, t in enumerate(targets)]
    image, _ = source[0]
    classes = [str(c) for c in getattr(source, "classes", range(max(targets) + 1))]
    return Listing(name, subset, "torchvision", str(root), classes, records, image_mode=image.mode,
                   memory_source=(name, str(root), train))
