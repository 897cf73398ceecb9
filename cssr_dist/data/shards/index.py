"""The shard-set contract: `<prefix>.json` index, `<prefix>.labels.npy`, member names.

A shard set is what `tools/make_shards.py` writes and `data/shards.py` reads:

    <prefix>.json          this index (classes, per-shard and per-class counts, how it was made)
    <prefix>.labels.npy    int64 original label of every sample id (-1 = OOD), no pickles
    <prefix>-000000.tar    WebDataset shards; sample keys are zero-padded ids (`%09d`)

The loader needs the counts BEFORE streaming (equal batch counts on every rank, exact
per-split sizes, a validation slice by id), which is why the index is a separate small
file that is always read locally, while shards may live anywhere `webdataset.gopen`
can open (`file:`, plain paths, `pipe:`; see docs/shards.md).

An index is untrusted input (shared storage, downloads): every shard name must be a plain
file name (resolved next to the index or under its base_url), and a base_url with a URL
scheme other than `file:` (`pipe:` runs a shell command) is used only after an explicit
opt-in, `data.shards.allow_url_schemes=true` or `CSSR_SHARD_URL_SCHEMES=1`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from ...errors import DataError

# A shard or labels file name: no path separators, no scheme, no shell syntax (a pipe:
# base_url appends it to a command line), not "." or "..", not an option ("-x").
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}")
URL_SCHEMES_ENV = "CSSR_SHARD_URL_SCHEMES"

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
    # where the shards are read from when not next to the index: `/mnt/data/`, `file:/mnt/data/`,
    # `pipe:curl -s https://host/dir/` (shard name appended; schemes other than file: need the
    # opt-in, see shard_urls); edit it in a local copy of the index
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
        if not isinstance(data.get("version", 0), int) or data.get("version", 0) > INDEX_VERSION:
            raise DataError(f"{where} has index version {data.get('version')!r}, this cssr-dist reads up to "
                            f"{INDEX_VERSION}; update cssr-dist or re-run tools/make_shards.py")
        missing = sorted(n for n in ("dataset", "classes", "shards", "class_counts", "total") if n not in data)
        if missing:
            raise DataError(f"{where} lacks index fields {missing}; re-run tools/make_shards.py")
        _check_types(data, where)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["shards"] = [ShardInfo(s["name"], s["samples"], s.get("bytes", 0)) for s in data["shards"]]
        kwargs.setdefault("subset", "")
        kwargs.setdefault("unknown_count", 0)
        kwargs.setdefault("image_encoding", {})
        index = cls(**kwargs)
        for name in [s.name for s in index.shards] + ([index.labels_file] if index.labels_file else []):
            check_file_name(name, where)
        counted = sum(s.samples for s in index.shards)
        if counted != index.total:
            raise DataError(f"{where}: shards hold {counted} samples but total says {index.total}; index is corrupt")
        return index


# field -> (accepted types, what to say); an index with wrong types is refused in one line
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "dataset": ((str,), "a string"), "subset": ((str,), "a string"), "image_mode": ((str,), "a string"),
    "total": ((int,), "an integer"), "unknown_count": ((int,), "an integer"),
    "labels_file": ((str, type(None)), "a file name or null"), "base_url": ((str, type(None)), "a string or null"),
    "image_encoding": ((dict,), "an object"), "made_with": ((dict,), "an object"),
    "classes": ((list,), "a list"), "class_counts": ((list,), "a list"), "shards": ((list,), "a list"),
    "wnids": ((list, type(None)), "a list or null"),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(data: dict[str, Any], where: str) -> None:
    """JSON gives any type anywhere: check before use, so a bad index is a DataError, not a TypeError."""
    def bad(field_name: str, expected: str) -> DataError:
        return DataError(f"{where}: index field '{field_name}' must be {expected}; the index is malformed, "
                         "re-run tools/make_shards.py")

    for key, (types, expected) in _FIELD_TYPES.items():
        if key in data and (not isinstance(data[key], types) or (int in types and isinstance(data[key], bool))):
            raise bad(key, expected)
    if not all(isinstance(c, str) for c in data["classes"]) or not all(isinstance(w, str) for w in data.get("wnids") or []):
        raise bad("classes", "a list of strings")
    if not all(_is_int(c) and c >= 0 for c in data["class_counts"]):
        raise bad("class_counts", "a list of non-negative integers")
    if data["total"] < 0:
        raise bad("total", "a non-negative integer")
    for i, shard in enumerate(data["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str) and _is_int(shard.get("samples"))
                and shard["samples"] >= 0 and _is_int(shard.get("bytes", 0))):
            raise bad(f"shards[{i}]", '{"name": file name, "samples": integer >= 0, "bytes": integer}')


def check_file_name(name: str, where: str) -> str:
    """A shard/labels name must be a plain file name: `../x`, `/etc/x`, `pipe:cmd` and shell syntax are refused."""
    if not SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise DataError(f"{where} names a shard file {name!r}: only plain file names (letters, digits, . _ + -) "
                        "next to the index are allowed; the index is malformed or crafted, re-run tools/make_shards.py")
    return name


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
    path = index_file.parent / check_file_name(index.labels_file, str(index_file))
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read sample labels {path}: {err}; re-run tools/make_shards.py") from None
    if labels.ndim != 1 or len(labels) != index.total:
        raise DataError(f"{path} holds {labels.shape} labels but the index total is {index.total}; re-run make_shards")
    return labels.astype(np.int64, copy=False)


def url_schemes_allowed(allow: bool | None = None) -> bool:
    """The opt-in for `pipe:`/remote base URLs: the argument (config), else the environment variable."""
    if allow is not None:
        return allow
    return os.environ.get(URL_SCHEMES_ENV, "").strip().lower() in ("1", "true", "yes")


def shard_urls(index: ShardIndex, index_file: Path, base_url: str | None = None,
               allow_url_schemes: bool | None = None) -> list[str]:
    """Where each shard is read from: `base_url + name` (argument, else the index's), else next to the index.

    Names were checked by `from_dict` (plain file names), so they cannot escape the folder or
    the base URL. A base URL with a scheme other than `file:` needs the explicit opt-in.
    """
    for shard in index.shards:
        check_file_name(shard.name, str(index_file))
    base_url = base_url or index.base_url
    if base_url:
        scheme = urlparse(base_url).scheme
        if len(scheme) > 1 and scheme != "file" and not url_schemes_allowed(allow_url_schemes):
            raise DataError(f"{index_file} reads shards through a '{scheme}:' URL ({base_url[:60]!r}); URL schemes other "
                            f"than file: (pipe: runs a shell command) need data.shards.allow_url_schemes=true or "
                            f"{URL_SCHEMES_ENV}=1 - only for indexes you trust")
        return [base_url + s.name for s in index.shards]
    return [str(index_file.parent / s.name) for s in index.shards]


def local_path(url: str) -> str | None:
    """The file behind a plain path or `file:` URL; None for `pipe:` and remote URLs."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    return url2pathname(parsed.path) if parsed.scheme == "file" else None
