"""The shard-set contract: `<prefix>.json` index, `<prefix>.labels.npy`, member names.

A shard set is what `tools/make_shards.py` writes and `data/shards.py` reads:

    <prefix>.json          this index (classes, per-shard and per-class counts, how it was made)
    <prefix>.labels.npy    int64 original label of every sample id (-1 = OOD), no pickles
    <prefix>-000000.tar    WebDataset shards; sample keys are zero-padded ids (`%09d`)

The loader needs the counts BEFORE streaming (equal batch counts on every rank, exact
per-split sizes, a validation slice by id), which is why the index is a separate small
file that is always read locally, while shards may live anywhere `webdataset.gopen`
can open (`file:`, plain paths, `pipe:`; see docs/shards.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from ...errors import DataError

INDEX_FORMAT = "cssr-dist-shards"
INDEX_VERSION = 1
KEY_FORMAT = "%09d"
SHARD_SUFFIX = "-%06d.tar"
# Members a sample may carry. Anything else (notably .pyd/.pickle, which webdataset would
# unpickle) is refused by the loader and by --verify: shards are data, never code.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
META_EXTS = ("cls", "txt")
ALLOWED_EXTS = IMAGE_EXTS + META_EXTS


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int = 0


@dataclass
class ShardIndex:
    """Everything about a shard set that must be known without opening a shard."""

    dataset: str
    subset: str
    classes: list[str]
    shards: list[ShardInfo]
    class_counts: list[int]
    unknown_count: int
    total: int
    image_encoding: dict[str, Any]
    image_mode: str = "RGB"
    wnids: list[str] | None = None
    labels_file: str | None = None
    # where the shards are read from when not next to the index: `pipe:curl -s https://host/dir/`,
    # `file:/mnt/data/` (shard name appended); edit it in a local copy of the index
    base_url: str | None = None
    made_with: dict[str, Any] = field(default_factory=dict)
    format: str = INDEX_FORMAT
    version: int = INDEX_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ShardIndex:
        if data.get("format") != INDEX_FORMAT:
            raise DataError(f"{where} is not a cssr-dist shard index (format={data.get('format')!r}); "
                            "make shards with tools/make_shards.py")
        if int(data.get("version", 0)) > INDEX_VERSION:
            raise DataError(f"{where} has index version {data['version']} > {INDEX_VERSION}; update cssr-dist")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in ("dataset", "classes", "shards", "class_counts", "total") if n not in data)
        if missing:
            raise DataError(f"{where} lacks index fields {missing}; re-run tools/make_shards.py")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["shards"] = [ShardInfo(**s) for s in data["shards"]]
        kwargs.setdefault("subset", "")
        kwargs.setdefault("unknown_count", 0)
        kwargs.setdefault("image_encoding", {})
        index = cls(**kwargs)
        counted = sum(s.samples for s in index.shards)
        if counted != index.total:
            raise DataError(f"{where}: shards hold {counted} samples but total says {index.total}; index is corrupt")
        return index


def index_path(prefix: str | os.PathLike) -> Path:
    """`p` -> `p.json`; a path that already ends in `.json` is taken as the index itself."""
    text = os.fspath(prefix)
    return Path(text if text.endswith(".json") else text + ".json")


def shard_name(prefix: str | os.PathLike, number: int) -> str:
    return Path(os.fspath(prefix)).name + SHARD_SUFFIX % number


def labels_name(prefix: str | os.PathLike) -> str:
    return Path(os.fspath(prefix)).name + ".labels.npy"


def resolve_prefix(spec: str, root: str | os.PathLike | None = None) -> Path:
    """Find the index of `spec`: absolute as given; relative first under `root`, then the cwd."""
    if not spec:
        raise DataError("empty shard prefix; set data.shards.train / data.shards.test to a prefix made by "
                        "tools/make_shards.py")
    direct = index_path(spec)
    candidates = [direct] if direct.is_absolute() or root is None else [Path(root) / direct, direct]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise DataError(f"shard index not found (tried {tried}); build it with tools/make_shards.py --out PREFIX")


def read_index(spec: str, root: str | os.PathLike | None = None) -> tuple[ShardIndex, Path]:
    """Read and validate `<prefix>.json`; returns the index and its path."""
    path = resolve_prefix(spec, root)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read shard index {path}: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"shard index {path} must be a JSON object")
    index = ShardIndex.from_dict(data, str(path))
    if not index.shards:
        raise DataError(f"shard index {path} lists no shards; the data set was empty when it was made")
    return index, path


def write_index(prefix: str | os.PathLike, index: ShardIndex) -> Path:
    """Atomic write (tmp + rename): a reader never sees half an index."""
    path = index_path(prefix)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(index.to_dict(), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def write_labels(prefix: str | os.PathLike, labels: np.ndarray) -> Path:
    path = Path(os.fspath(prefix)).with_name(labels_name(prefix))
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, np.asarray(labels, dtype=np.int64), allow_pickle=False)
    os.replace(tmp, path)
    return path


def read_labels(index: ShardIndex, index_file: Path) -> np.ndarray:
    """Original label per sample id; length must equal the index total."""
    if not index.labels_file:
        raise DataError(f"{index_file} names no labels_file; re-run tools/make_shards.py to add it")
    path = index_file.parent / index.labels_file
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read sample labels {path}: {err}; re-run tools/make_shards.py") from None
    if labels.ndim != 1 or len(labels) != index.total:
        raise DataError(f"{path} holds {labels.shape} labels but the index total is {index.total}; re-run make_shards")
    return labels.astype(np.int64, copy=False)


def shard_urls(index: ShardIndex, index_file: Path, base_url: str | None = None) -> list[str]:
    """Where each shard is read from: `base_url + name` (argument, else the index's), else next to the index."""
    base_url = base_url or index.base_url
    if base_url:
        return [base_url + s.name for s in index.shards]
    return [str(index_file.parent / s.name) for s in index.shards]


def local_path(url: str) -> str | None:
    """The file behind a plain path or `file:` URL; None for `pipe:` and remote URLs."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    return url2pathname(parsed.path) if parsed.scheme == "file" else None
