"""One shard sample: its members checked, its id, label and image decoded; a shard's samples in order.

The shard format's reading side, shared by the shard reader (data/readers/shards.py), the
offline `make_shards --verify` and `cssr-predict` on shard prefixes. Decoding is explicit:
image bytes through PIL, `.cls` as an ASCII int; members that webdataset would unpickle
(`.pyd`, `.pickle`) or that we do not know are refused.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from typing import Callable, Iterator

import PIL.Image
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ...errors import DataError
from ..layouts import IMAGE_READ_ERRORS
from .index import ALLOWED_EXTS, IMAGE_EXTS
from .tar import open_tar_stream, tar_members

#: The project's tar reader (tar.py) is kept only while the end-to-end loader benchmark
#: measures it at least 5% faster than webdataset's `tar_file_iterator` (benchmarks/bench_data.py
#: --tar-readers; docs/benchmarks/data.md). `CSSR_DIST_TAR_READER=webdataset` switches, for
#: that benchmark.
TAR_READER_ENV = "CSSR_DIST_TAR_READER"

class CorruptSample(Exception):
    """A sample that cannot be used (bad image, no label, ...): skipped and counted."""


def check_members(sample: dict, url: str) -> None:
    """Refuse members we would not decode: never unpickle, never guess (hard error, not a skip)."""
    for key in sample:
        if key.startswith("__"):
            continue
        if key not in ALLOWED_EXTS:
            raise DataError(f"shard {url} sample {sample.get('__key__')!r} has a '.{key}' member; cssr-dist only "
                            f"reads {', '.join(ALLOWED_EXTS)} and never unpickles - rebuild with tools/make_shards.py")


def parse_id(sample: dict) -> int:
    key = str(sample.get("__key__", ""))
    if not re.fullmatch(r"\d+", key.rsplit("/", 1)[-1]):
        raise CorruptSample(f"key {key!r} is not an integer sample id")
    return int(key.rsplit("/", 1)[-1])


def parse_label(sample: dict) -> int:
    if "cls" not in sample:
        raise CorruptSample("no .cls label")
    try:
        return int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise CorruptSample(f".cls is not an integer ({sample['cls'][:20]!r})") from None


def image_member(sample: dict) -> str:
    members = [k for k in IMAGE_EXTS if k in sample]
    if len(members) != 1:
        raise CorruptSample(f"expected one image member, found {members or 'none'}")
    return members[0]


def decode_image(sample: dict, mode: str | None) -> PIL.Image.Image:
    """The sample's image, fully decoded (truncated files fail here, not later in a transform)."""
    try:
        image = PIL.Image.open(io.BytesIO(sample[image_member(sample)]))
        image.load()
        return image.convert(mode) if mode and image.mode != mode else image
    except IMAGE_READ_ERRORS as err:
        raise CorruptSample(f"image does not decode ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------- reading tar shards
def _tar_files(url: str, on_tar_error: Callable[[str, Exception], None]) -> Iterator[dict]:
    """Members of one shard as webdataset file dicts; the stream is always closed."""
    try:
        stream = wds.gopen(url)
    except OSError as err:
        raise DataError(f"cannot open shard {url}: {err}; check the shard location (index base_url)") from None
    try:
        if os.environ.get(TAR_READER_ENV, "own") == "webdataset":
            members = ((f["fname"], f["data"]) for f in tar_file_iterator(stream))
        else:
            members = tar_members(open_tar_stream(stream, url))
        for name, data in members:
            if "/" not in name and name.startswith("__") and name.endswith("__"):
                continue  # archive-level metadata, as webdataset skips it
            yield {"fname": name, "data": data, "__url__": url}
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        on_tar_error(url, err)
    finally:
        try:
            stream.close()  # a `pipe:` reports its command's failure here
        except OSError as err:
            on_tar_error(url, err)


def iter_shard(url: str, on_tar_error: Callable[[str, Exception], None]) -> Iterator[dict]:
    """Samples (member dicts grouped by key) of one shard."""
    files = _tar_files(url, on_tar_error)
    try:
        yield from group_by_keys(files, handler=lambda err: on_tar_error(url, err) or True)
    finally:
        files.close()


