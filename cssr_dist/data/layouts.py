"""ONE listing per on-disk layout, shared by the native reader (data/sources.py) and make_shards.

Each `list_*` function turns one layout into a `Listing` (class names, optional WordNet
ids, records in a fixed order), so a native run and a shard run of the same folder see
the same images in the same order:

* ImageFolder trees (ImageNet train: `<root>/<wnid>/*.JPEG`; any depth below a class)
* flat folders with a label file (ImageNet val; Tiny-ImageNet val) - see `read_flat_labels`
* Tiny-ImageNet (`train/<wnid>/images`, `val/images` + `val/val_annotations.txt`)
* OOD image folders (label -1, any depth)
* plain file lists (`path label` lines)

The policy, the same for every layout (`image_files`, `class_folders`):

* hidden entries are skipped: a file or folder whose name starts with `.` (`.DS_Store`,
  macOS `._x.jpg` resource forks, `.ipynb_checkpoints/`) is never an image or a class;
* symlinks are followed, to files and to folders (a data set assembled from links reads
  as if copied); a link to a folder above it (a loop) and a broken link are skipped;
* nested folders below a class (or below an OOD root) are read at any depth;
* order: by path relative to the listed folder, as a POSIX string compared by code point
  (`a/b.png` after `a-c.png`), the same on every file system and machine;
* images are recognised by suffix (`IMAGE_SUFFIXES`, any case).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import PIL.Image

from ..errors import DataError

#: What PIL raises for a file that is not a usable image (truncated, not an image, over
#: `Image.MAX_IMAGE_PIXELS`; UnidentifiedImageError is an OSError): every reader that decodes
#: images catches exactly these, so a bad image is handled alike in training, shards and predict.
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WNID = re.compile(r"^n\d{8}$")
LABEL_FORMATS = ("auto", "ilsvrc-gt", "loc-csv", "filename-wnid")


class Record(NamedTuple):
    """One sample: `ref` is a file path or an index into an in-memory source."""

    ref: str | int
    label: int
    name: str


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
    skipped: "Skipped" = field(default_factory=lambda: Skipped())  # files the policy left out, by reason


def is_image_name(name: str) -> bool:
    """An image by the policy above: a known suffix, not hidden."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _loops_back(dirpath: str, name: str) -> bool:
    """A symlinked folder that points at itself or a folder above it (walking it never ends)."""
    link = os.path.join(dirpath, name)
    if not os.path.islink(link):
        return False
    target, here = os.path.realpath(link), os.path.realpath(dirpath)
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


class Skipped:
    """What a listing left out, by reason, with the first example of each: make_shards reports it,
    so a folder of `.txt` files or PDFs next to the images is never dropped unnoticed."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, reason: str, path: str | Path) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, str(path))

    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        """e.g. `3 not images by suffix (e.g. /d/n01/readme.txt), 1 hidden (e.g. /d/n01/.DS_Store)`."""
        return ", ".join(f"{n} {reason} (e.g. {self.examples[reason]})" for reason, n in self.counts.most_common())


def _file_skip_reason(dirpath: str, name: str) -> str | None:
    if name.startswith("."):
        return "hidden"
    if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
        return f"not images by suffix ({', '.join(IMAGE_SUFFIXES)})"
    if not os.path.isfile(os.path.join(dirpath, name)):
        return "broken links or not files"
    return None


def image_files(folder: str | Path, skipped: Skipped | None = None) -> list[Path]:
    """All images below `folder` at any depth, in the policy's order (relative POSIX path);
    what the policy leaves out is counted into `skipped` (hidden folders count once each)."""
    folder = Path(folder)
    skipped = skipped if skipped is not None else Skipped()
    found = []
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        for d in dirnames:
            if d.startswith("."):
                skipped.add("hidden", os.path.join(dirpath, d))
            elif _loops_back(dirpath, d):
                skipped.add("folder links that loop back", os.path.join(dirpath, d))
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not _loops_back(dirpath, d)]
        for f in files:
            reason = _file_skip_reason(dirpath, f)
            if reason is None:
                found.append(Path(dirpath) / f)
            else:
                skipped.add(reason, os.path.join(dirpath, f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def class_folders(folder: str | Path) -> list[str]:
    """Names of the class folders of an ImageFolder root (links to folders count), sorted; hidden skipped."""
    return sorted(d.name for d in Path(folder).iterdir() if d.is_dir() and not d.name.startswith("."))


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
    keys = class_folders(base)
    if not keys:
        raise DataError(f"{dataset}: no class folders in {base}; expected {base}/<class>/<image> (a flat folder of "
                        "unknowns is an OOD folder: data source 'oodfolder', make_shards --source ood)")
    records, skipped = [], Skipped()
    for entry in sorted(base.iterdir()):
        if entry.name.startswith("."):
            skipped.add("hidden", entry)
        elif not entry.is_dir():
            skipped.add("files outside the class folders", entry)
    for label, key in enumerate(keys):
        for path in image_files(base / key, skipped):
            records.append(Record(str(path), label, path.relative_to(base).as_posix()))
    if not records:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) below {base}")
    wnids = keys if all(WNID.match(k) for k in keys) else None
    return Listing(dataset, subset, "imagefolder", str(base), read_class_names(class_names, keys), records, wnids,
                   skipped=skipped)


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
        import scipy.io  # start-up time: scipy only for the devkit's meta.mat

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
        return class_folders(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return list(data.get("wnids") or data["classes"])
    return [ln.split()[0] for ln in _read_lines(path)]


def list_flat(root: str | Path, label_file: str | Path, dataset: str, subset: str, fmt: str = "auto",
              id_map: str | Path | None = None, classes_from: str | Path | None = None,
              class_names: str | None = None) -> Listing:
    """Flat folder of images + label file (ImageNet val, Tiny-ImageNet val/images)."""
    base = _require_dir(root, "flat image")
    skipped = Skipped()
    files = image_files(base, skipped)
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
    return Listing(dataset, subset, "flat", str(base), read_class_names(class_names, order), records, wnids,
                   skipped=skipped)


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
    skipped = Skipped()
    files = image_files(base, skipped)
    if not files:
        raise DataError(f"OOD set '{dataset}': no images ({', '.join(IMAGE_SUFFIXES)}) below {base}")
    records = [Record(str(p), -1, p.relative_to(base).as_posix()) for p in files]
    return Listing(dataset, "ood", "ood", str(base), [], records, skipped=skipped)


def _filelist_lines(path: Path) -> list[tuple[int, str, int]]:
    """(line number, relative path, label) of each non-blank `path label` line.

    The format of OpenOOD's `benchmark_imglist/*.txt` (and any plain list): the label is the
    last whitespace-separated token (an int, -1 = unknown), the path everything before it
    (it may contain spaces); paths are relative (OpenOOD refuses a leading `/` too) and may
    not leave the image root (`..`). Any other line stops with `file:line`."""
    if not path.is_file():
        raise DataError(f"file list not found: {path}; pass --list FILE of 'path label' lines")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read file list {path}: {err}") from None
    rows = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise DataError(f"{path}:{number}: expected 'path label' (label an integer, -1 = unknown), "
                            f"got {line[:120]!r}")
        rel = parts[0]
        if rel.startswith(("/", "\\")) or ".." in Path(rel).parts:
            raise DataError(f"{path}:{number}: path {rel[:120]!r} must be relative to --root and stay below it")
        label = int(parts[1])
        if label < -1:
            raise DataError(f"{path}:{number}: label {label}; labels are class indices >= 0, or -1 for unknown")
        rows.append((number, rel, label))
    if not rows:
        raise DataError(f"file list {path} is empty")
    return rows


def list_filelist(list_file: str | Path, root: str | Path | None, dataset: str, subset: str,
                  class_names: str | None = None, classes_from: str | Path | None = None,
                  expected: int | None = None) -> Listing:
    """`path label` lines (OpenOOD's benchmark_imglist format; path relative to `root`).

    `classes_from` (a training shard index, a folder of class folders or a list) gives the
    class order the labels index, so an ID test list gets the training set's classes (OpenOOD's
    ImageNet labels are sorted-wnid positions, the order of `--source imagefolder`);
    `expected`: the number of lines the list must have (checked before any image is looked at)."""
    path = Path(list_file)
    base = Path(root) if root else path.parent
    rows = _filelist_lines(path)
    if expected is not None and len(rows) != expected:
        raise DataError(f"{path} has {len(rows)} 'path label' lines, expected {expected} (OpenOOD v1.5's published "
                        "list); download the list again, or pass --expect-lines N (0: no check) if this is intended")
    order = read_class_order(classes_from, []) if classes_from else None
    if order is not None:
        beyond = next(((n, label) for n, _, label in rows if label >= len(order)), None)
        if beyond:
            raise DataError(f"{path}:{beyond[0]}: label {beyond[1]}, but --classes-from {classes_from} has "
                            f"{len(order)} classes")
    records = [Record(str(base / rel), label, rel) for _, rel, label in rows]
    missing = [r.ref for r in records if not Path(r.ref).is_file()]
    if missing:
        raise DataError(f"{len(missing)} files of {path} do not exist (e.g. {missing[0]}); paths are relative "
                        f"to --root {base}")
    records.sort(key=lambda r: r.name)
    if order is None:
        order = [str(i) for i in range(max(r.label for r in records) + 1)]
    wnids = order if order and all(WNID.match(w) for w in order) else None
    return Listing(dataset, subset, "filelist", str(base), read_class_names(class_names, order), records, wnids)
