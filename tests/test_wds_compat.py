"""Without webdataset (the GPU image) the shard stream reads the same samples in the same
order: the fallbacks of data/shards/wds_compat.py against webdataset's own pieces, and the
stream module importing with webdataset blocked."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

wds = pytest.importorskip("webdataset")
from webdataset.tariterators import group_by_keys as wds_group_by_keys  # noqa: E402

from cssr_dist.data.shards import wds_compat  # noqa: E402
from cssr_dist.errors import DataError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bufsize,initial,count", [(8, 3, 50), (100, 100, 20), (5, 10, 7), (1, 1, 4)])
def test_shuffle_draws_the_same_order_as_webdatasets(bufsize, initial, count):
    ours = list(wds_compat.own_shuffle(bufsize, initial=initial, rng=random.Random("s"))(iter(range(count))))
    theirs = list(wds.shuffle(bufsize, initial=initial, rng=random.Random("s"))(iter(range(count))))
    assert ours == theirs and sorted(ours) == list(range(count))
    assert (ours != list(range(count))) == (bufsize > 1)  # a buffer of one shuffles nothing


@pytest.mark.parametrize("partial", [True, False])
def test_batched_matches_webdatasets(partial):
    ours = list(wds_compat.own_batched(4, collation_fn=tuple, partial=partial)(iter(range(10))))
    theirs = list(wds.batched(4, collation_fn=tuple, partial=partial)(iter(range(10))))
    assert ours == theirs == [(0, 1, 2, 3), (4, 5, 6, 7)] + ([(8, 9)] if partial else [])


def test_group_by_keys_matches_webdatasets_including_duplicates():
    names = ["a/000.jpg", "a/000.CLS", "a/001.jpg", "a/001.jpg", "a/001.cls", "noext", "b.x.txt", "b.x.cls"]
    files = [{"fname": n, "data": n.encode(), "__url__": "u"} for n in names]
    errors_ours, errors_theirs = [], []
    ours = list(wds_compat.own_group_by_keys(iter(files), handler=lambda e: errors_ours.append(e) or True))
    theirs = list(wds_group_by_keys(iter(files), handler=lambda e: errors_theirs.append(e) or True))
    assert ours == theirs
    assert [s["__key__"] for s in ours] == ["a/000", "a/001", "b"] and "x.txt" in ours[2]
    assert len(errors_ours) == len(errors_theirs) == 1  # the duplicate a/001.jpg


def test_gopen_reads_local_paths_and_refuses_pipes_without_webdataset(tmp_path):
    (tmp_path / "s.tar").write_bytes(b"abc")
    for url in (str(tmp_path / "s.tar"), f"file:{tmp_path / 's.tar'}"):
        with wds_compat.own_gopen(url) as stream:
            assert stream.read() == b"abc"
    with pytest.raises(DataError, match=r"reading pipe: URLs needs webdataset"):
        wds_compat.own_gopen("pipe:cat x.tar")


def test_the_stream_imports_and_uses_the_fallbacks_when_webdataset_is_missing():
    code = ("import sys; sys.modules['webdataset'] = None; sys.modules['wandb'] = None\n"
            "from cssr_dist.data.shards import stream, wds_compat\n"
            "assert not wds_compat.HAVE_WEBDATASET and stream.wds.shuffle is wds_compat.own_shuffle\n"
            "from cssr_dist.data import device_augment\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
