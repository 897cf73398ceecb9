"""The four webdataset pieces the shard stream uses, also when webdataset is not installed.

`gopen`, `group_by_keys`, `shuffle` and `batched` are webdataset's own when it imports.
Why a fallback at all: the GPU machines this project benchmarks on ship torch, torchvision
and timm but no webdataset and no network (issue 12), and the stream's tar reading is
already the project's own (`tar.py`). The fallbacks are the same algorithms, drawing the
same random numbers, so a run reads the same samples in the same order either way
(tests/test_wds_compat.py compares them with webdataset's); without webdataset only
local shard paths (`/path`, `file:`) can be opened.
"""

from __future__ import annotations

import random
import re
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from ...errors import DataError
from .index import local_path

_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def own_gopen(url: str) -> BinaryIO:
    """A local shard opened for reading; other URL schemes need webdataset's gopen."""
    path = local_path(url)
    if path is None:
        raise DataError(f"cannot open shard {url}: reading {url.split(':', 1)[0]}: URLs needs webdataset "
                        "(pip install webdataset); without it only local shard paths work")
    return open(path, "rb")


def own_group_by_keys(files: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Tar members {fname, data, __url__} -> samples {__key__, __url__, ext: bytes, ...}."""
    current: dict | None = None
    for item in files:
        try:
            match = _KEY_SUFFIX.match(item["fname"])
            if not match:
                continue
            key, suffix = match.group(1), match.group(2).lower()
            if current is None or key != current["__key__"]:
                if current:
                    yield current
                current = {"__key__": key, "__url__": item["__url__"]}
            if suffix in current:
                raise ValueError(f"{item['fname']}: duplicate file name in tar file {suffix} {current.keys()}")
            current[suffix] = item["data"]
        except Exception as err:  # noqa: BLE001 - webdataset's contract: the handler decides
            if not handler(err):
                break
    if current:
        yield current


def own_shuffle(bufsize: int, initial: int, rng: random.Random) -> Callable[[Iterator], Iterator]:
    """A shuffle buffer of `bufsize` items that starts yielding at `initial` (webdataset's)."""
    initial = min(initial, bufsize)

    def pick(buf: list) -> Any:
        k = rng.randint(0, len(buf) - 1)
        item, buf[k] = buf[k], buf[-1]
        buf.pop()
        return item

    def stage(data: Iterator) -> Iterator:
        buf: list = []
        for item in data:
            buf.append(item)
            if len(buf) < bufsize:
                try:
                    buf.append(next(data))
                except StopIteration:
                    pass
            if len(buf) >= initial:
                yield pick(buf)
        while buf:
            yield pick(buf)

    return stage


def own_batched(batchsize: int, collation_fn: Callable[[list], Any], partial: bool = True) -> Callable[[Iterator], Iterator]:
    """Groups of `batchsize` items through `collation_fn`; the last short one only if `partial`."""

    def stage(data: Iterator) -> Iterator:
        batch: list = []
        for item in data:
            if len(batch) >= batchsize:
                yield collation_fn(batch)
                batch = []
            batch.append(item)
        if batch and (len(batch) == batchsize or partial):
            yield collation_fn(batch)

    return stage


try:
    import webdataset as _wds
    from webdataset.tariterators import group_by_keys as _wds_group_by_keys

    HAVE_WEBDATASET = True
    gopen, shuffle, batched = _wds.gopen, _wds.shuffle, _wds.batched

    def group_by_keys(files: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
        return _wds_group_by_keys(files, handler=handler)
except ImportError:
    HAVE_WEBDATASET = False
    gopen, group_by_keys, shuffle, batched = own_gopen, own_group_by_keys, own_shuffle, own_batched

__all__ = ["HAVE_WEBDATASET", "batched", "gopen", "group_by_keys", "shuffle"]
