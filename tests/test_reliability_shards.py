"""Untrusted shard sets are attacks, not data: crafted indexes and tar headers.

Each test is the attack itself: an index naming `pipe:touch MARKER` (a marker file must not
appear), `../` and absolute names, wrong JSON types; a pax record of length 0 (looped for
ever before), a huge size field (MemoryError before); a shard read that hangs.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from cssr_dist.config import DataConfig
from cssr_dist.data.readers import base as reader_base
from cssr_dist.apps.make_shards.cli import ShardOptions, make_shard_set
from cssr_dist.apps.make_shards.cli import main as make_shards
from cssr_dist.data.shards.index import read_index
from cssr_dist.data.layouts import list_imagefolder
from cssr_dist.data.readers.shards import build_shard_loaders
from cssr_dist.data.shards.tar import tar_members
from cssr_dist.data.splits import OpenSetSplit
from cssr_dist.errors import DataError
from tests.helpers import ROOT

SPLIT = OpenSetSplit("toy", (1, 0), name="toy")


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    """A 2-class, 12-image shard set `toy` in 3 shards (+ its index and labels)."""
    tmp = tmp_path_factory.mktemp("reliability_shards")
    raw = tmp / "raw"
    for c in range(2):
        (raw / f"c{c}").mkdir(parents=True)
        for i in range(6):
            PIL.Image.new("RGB", (4, 4), (40 * i, c * 90, 7)).save(raw / f"c{c}" / f"{i}.png")
    make_shard_set(list_imagefolder(raw, "toy", "train"), tmp / "shards" / "toy",
                   ShardOptions(samples_per_shard=4, progress=False))
    return tmp / "shards"


def crafted_copy(shard_set: Path, tmp: Path, **changes) -> Path:
    """A copy of the index (labels beside it) with fields replaced; shards stay where they are."""
    index = json.loads((shard_set / "toy.json").read_text())
    index.update(changes)
    (tmp / "toy.json").write_text(json.dumps(index))
    (tmp / "toy.labels.npy").write_bytes((shard_set / "toy.labels.npy").read_bytes())
    for tar in shard_set.glob("toy-*.tar"):
        (tmp / tar.name).write_bytes(tar.read_bytes())
    return tmp


def data_cfg(root: Path, allow: bool = False) -> DataConfig:
    cfg = DataConfig(format="shards", root=str(root), batch_size=2, eval_batch_size=4, num_workers=0,
                     val_fraction=0.0)
    cfg.shards.train = cfg.shards.test = "toy"
    cfg.shards.allow_url_schemes = allow
    return cfg


def shards_named(shard_set: Path, name: str) -> list[dict]:
    shards = json.loads((shard_set / "toy.json").read_text())["shards"]
    shards[1] = {**shards[1], "name": name}
    return shards


# ---------------------------------------------------------------- crafted index
def test_pipe_shard_name_runs_nothing_in_training_or_verify(shard_set, tmp_path):
    marker = tmp_path / "MARKER"
    (tmp_path / "idx").mkdir()
    crafted = crafted_copy(shard_set, tmp_path / "idx", shards=shards_named(shard_set, f"pipe:touch {marker}"))
    with pytest.raises(DataError, match=r"names a shard file 'pipe:touch .*only plain file names"):
        build_shard_loaders(data_cfg(crafted), SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)
    # the command-line verifier refuses it the same way (exit 2, one line), in a fresh process
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--verify-only",
                          str(crafted / "toy"), "--no-progress"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "only plain file names" in out.stderr
    time.sleep(0.2)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../toy-000001.tar", "/etc/passwd", "a/../../b.tar", "..", "x;touch y.tar",
                                  "$(touch y).tar", "-rf.tar", "file:/etc/passwd"])
def test_names_that_leave_the_folder_or_reach_a_shell_are_refused(shard_set, tmp_path, name):
    crafted = crafted_copy(shard_set, tmp_path, shards=shards_named(shard_set, name))
    with pytest.raises(DataError, match="only plain file names"):
        read_index(str(crafted / "toy"))


def test_labels_file_outside_the_folder_is_refused(shard_set, tmp_path):
    crafted = crafted_copy(shard_set, tmp_path, labels_file="../../secret.npy")
    with pytest.raises(DataError, match="'../../secret.npy'.*only plain file names"):
        read_index(str(crafted / "toy"))


def test_pipe_base_url_needs_the_explicit_opt_in(shard_set, tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    crafted = crafted_copy(shard_set, tmp_path, base_url=f"pipe:touch {marker}; cat {shard_set}/")
    with pytest.raises(DataError, match=r"'pipe:' URL .*data.shards.allow_url_schemes=true or CSSR_SHARD_URL_SCHEMES=1"):
        build_shard_loaders(data_cfg(crafted), SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)
    assert make_shards(["--verify-only", str(crafted / "toy"), "--no-progress"]) == 2
    assert not marker.exists()
    # opted in (config, or the environment for make_shards): the trusted pipe: works
    loaders = build_shard_loaders(data_cfg(crafted, allow=True), SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)
    ids = sorted(i for _, _, batch in loaders["test"] for i in batch.tolist())
    assert ids == list(range(12)) and marker.exists()
    marker.unlink()
    monkeypatch.setenv("CSSR_SHARD_URL_SCHEMES", "1")
    assert make_shards(["--verify-only", str(crafted / "toy"), "--no-progress", "--workers", "1"]) == 0


@pytest.mark.parametrize("field,value,message", [
    ("shards", [["toy-000000.tar", 4]], r"'shards\[0\]' must be"),
    ("shards", "toy-000000.tar", "'shards' must be a list"),
    ("total", "12", "'total' must be an integer"),
    ("classes", [1, 2], "'classes' must be a list of strings"),
    ("class_counts", [6, "6"], "'class_counts' must be a list of non-negative integers"),
    ("labels_file", 7, "'labels_file' must be a file name or null"),
    ("version", "1", "index version '1'"),
])
def test_malformed_index_is_one_line_data_error(shard_set, tmp_path, field, value, message):
    crafted = crafted_copy(shard_set, tmp_path, **{field: value})
    with pytest.raises(DataError, match=message) as err:
        read_index(str(crafted / "toy"))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- crafted tar headers
def _header(name: bytes, size_field: bytes, kind: bytes) -> bytes:
    header = bytearray(512)
    header[:len(name)] = name
    header[100:108] = b"0000644\0"
    header[124:136] = size_field
    header[136:148] = b"00000000000\0"
    header[156:157] = kind
    header[257:263] = b"ustar\0"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def test_pax_record_of_length_zero_is_an_error_not_a_hang(tmp_path):
    pax = b"0 path=x\n".ljust(512, b"\0")
    data = _header(b"PaxHeader", b"%011o\0" % 9, b"x") + pax + _header(b"1.png", b"%011o\0" % 0, b"0") + bytes(1024)
    script = ("import io, sys, tarfile\nfrom cssr_dist.data.shards.tar import tar_members\n"
              "try:\n    list(tar_members(io.BytesIO(sys.stdin.buffer.read())))\n"
              "except tarfile.ReadError as err:\n    print('ReadError', err)\n")
    out = subprocess.run([sys.executable, "-c", script], input=data, capture_output=True, timeout=180, cwd=ROOT)
    assert out.stdout.decode().startswith("ReadError bad pax record length 0"), out.stderr.decode()[-500:]


@pytest.mark.parametrize("size_field", [b"77777777777\0", b"\x80" + b"\0" * 3 + b"\x7f" + b"\xff" * 7])
def test_huge_size_field_is_an_error_not_a_memory_error(size_field):
    data = _header(b"000000001.png", size_field, b"0") + bytes(2048)
    with pytest.raises(tarfile.ReadError, match="exceeds"):
        list(tar_members(io.BytesIO(data)))


@pytest.mark.parametrize("size_field", [b"9999\0\0\0\0\0\0\0\0", b"zz\0\0\0\0\0\0\0\0\0\0"])
def test_garbage_number_field_is_a_read_error(size_field):
    with pytest.raises(tarfile.ReadError, match="bad number"):
        list(tar_members(io.BytesIO(_header(b"1.png", size_field, b"0") + bytes(1024))))


def test_crafted_shard_counts_as_corrupt_samples_in_the_loader(shard_set, tmp_path):
    """The reader's errors reach the loader as corrupt samples of that shard (not a crash)."""
    crafted = crafted_copy(shard_set, tmp_path)
    good = (crafted / "toy-000001.tar").read_bytes()
    (crafted / "toy-000001.tar").write_bytes(_header(b"000000004.png", b"77777777777\0", b"0") + good)
    cfg = data_cfg(crafted)
    cfg.shards.max_corrupt_fraction = 0.5
    loader = build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)["test"]
    ids = sorted(i for _, _, batch in loader for i in batch.tolist())
    assert ids == [0, 1, 2, 3, 8, 9, 10, 11] and loader.corrupt_counts() == (12, 4)


def test_a_hung_shard_read_fails_the_loader_after_the_worker_timeout(shard_set, tmp_path, monkeypatch):
    crafted = crafted_copy(shard_set, tmp_path, base_url=f"pipe:sleep 60; cat {shard_set}/")
    cfg = data_cfg(crafted, allow=True)
    cfg.num_workers = 1
    monkeypatch.setattr(reader_base, "WORKER_TIMEOUT_S", 2)
    loader = build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)["test"]
    start = time.monotonic()
    with pytest.raises(DataError, match="delivered nothing for 2 s"):
        list(loader)
    assert time.monotonic() - start < 30


def test_summary_reports_samples_skipped_per_set(shard_set, tmp_path):
    from cssr_dist.data.readers import RunData

    crafted = crafted_copy(shard_set, tmp_path)
    data = (crafted / "toy-000002.tar").read_bytes()
    (crafted / "toy-000002.tar").write_bytes(data[:1500])  # truncated: samples 9-11 lost, 8 maybe
    cfg = data_cfg(crafted)
    cfg.shards.max_corrupt_fraction = 0.5
    loaders = build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)
    kept = sum(len(batch) for _, _, batch in loaders["test"])
    data = RunData(train=loaders["train"], val=loaders["val"], train_eval=loaders["train_eval"], test=loaders["test"],
                   ood={}, meta=None)
    report = data.corrupt_samples(lambda counts: counts)
    assert report["test"] == {"seen": 12, "skipped": 12 - kept} and 0 < 12 - kept <= 4
    assert report["train_eval"] == {"seen": 0, "skipped": 0}  # not read yet


def test_corrupt_samples_of_one_evaluation_count_every_set_it_read_once(shard_set, tmp_path):
    """Issue 19: the counts were taken before the OOD sets were read (`seen 0` for a set that was
    evaluated), and summed over every evaluation so far. Now: counted after the reads, since a
    baseline taken before the evaluation (`since`), and sets not read since are left out."""
    from cssr_dist.config import OodSetConfig
    from cssr_dist.data.readers import RunData

    crafted = crafted_copy(shard_set, tmp_path)
    data = (crafted / "toy-000002.tar").read_bytes()
    (crafted / "toy-000002.tar").write_bytes(data[:1500])  # truncated: samples 9-11 lost, 8 maybe
    cfg = data_cfg(crafted)
    cfg.shards.max_corrupt_fraction = 0.5
    cfg.ood = [OodSetConfig(name="far", shards="toy")]
    loaders = build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)
    data = RunData(train=loaders["train"], val=loaders["val"], train_eval=loaders["train_eval"], test=loaders["test"],
                   ood=loaders["ood"], meta=None)
    list(loaders["test"])  # an earlier evaluation read the test set once
    before = data.corrupt_counts()
    kept = {name: sum(len(ids) for _, _, ids in loader) for name, loader in (("test", loaders["test"]),
                                                                           ("ood/far", loaders["ood"]["far"]))}
    report = data.corrupt_samples(lambda counts: counts, since=before)
    assert report == {name: {"seen": 12, "skipped": 12 - n} for name, n in kept.items()}  # train_eval not read
    assert 0 < 12 - kept["ood/far"] <= 4
    assert data.corrupt_samples(lambda counts: counts)["test"]["seen"] == 24  # without `since`: every read so far
