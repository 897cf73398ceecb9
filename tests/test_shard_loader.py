"""The shard loader: exactly-once evaluation across ranks x workers, equal training batches,
corrupt samples skipped and counted, unpickling refused, clear errors, closed files."""

from __future__ import annotations

import gc
import io
import json
import os
import socket
import tarfile
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

from cssr_dist.config import DataConfig, OodSetConfig
from cssr_dist.apps.make_shards.cli import ShardOptions, make_shard_set
from cssr_dist.data.shards.index import read_index
from cssr_dist.data.layouts import list_imagefolder, list_ood
from cssr_dist.data.shards.tar import tar_members
from cssr_dist.data.readers.shards import build_shard_loaders, iter_shard
from cssr_dist.data.splits import OpenSetSplit
from cssr_dist.errors import DataError

CLASSES, PER_CLASS = 4, 10  # 40 training images


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float32).copy()).permute(2, 0, 1)


def write_tree(root: Path, classes: int, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            PIL.Image.fromarray(rng.integers(0, 255, (6, 7, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def make_set(tmp: Path, name: str, per_shard: int, classes: int = CLASSES, per_class: int = PER_CLASS) -> str:
    listing = list_imagefolder(write_tree(tmp / f"raw_{name}", classes, per_class, len(name)), name, "train")
    make_shard_set(listing, tmp / "shards" / name, ShardOptions(samples_per_shard=per_shard, progress=False))
    return name


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("shards")
    make_set(tmp, "train", 4)  # 10 shards
    make_set(tmp, "test", 3, per_class=5)  # 7 shards, 20 images
    make_set(tmp, "few", 14)  # 3 shards
    ood = tmp / "raw_ood" / "deep" / "er"
    ood.mkdir(parents=True)
    for i in range(9):
        PIL.Image.new("RGB", (5, 5), (i, 0, 0)).save(ood / f"{i}.jpg")
    make_shard_set(list_ood(tmp / "raw_ood", "oodx"), tmp / "shards" / "oodx",
                   ShardOptions(samples_per_shard=2, progress=False))
    return tmp / "shards"


def config(root: Path, train: str = "train", test: str = "test", **kw) -> DataConfig:
    cfg = DataConfig(format="shards", root=str(root), batch_size=kw.pop("batch_size", 3),
                     eval_batch_size=kw.pop("eval_batch_size", 4), num_workers=kw.pop("num_workers", 2),
                     val_fraction=kw.pop("val_fraction", 0.2), **kw)
    cfg.shards.train, cfg.shards.test, cfg.shards.shuffle_buffer = train, test, 8
    return cfg


SPLIT = OpenSetSplit("toy", (3, 1), name="toy")  # classes 0 and 2 unknown


def collect(loader) -> tuple[list[int], list[int], list[int]]:
    ids, labels, sizes = [], [], []
    for images, y, i in loader:
        assert images.dtype == torch.float32 and y.dtype == torch.int64 and i.dtype == torch.int64
        assert images.shape[0] == y.shape[0] == i.shape[0]
        ids += i.tolist()
        labels += y.tolist()
        sizes.append(len(i))
    return ids, labels, sizes


def expected_labels(root: Path, name: str, table: dict[int, int]) -> dict[int, int]:
    labels = np.load(root / f"{name}.labels.npy")
    return {i: table.get(int(o), -1) for i, o in enumerate(labels)}


def test_evaluation_sees_every_sample_exactly_once_2_ranks_x_2_workers(sets):
    cfg = config(sets, ood=[OodSetConfig(name="oodx", shards="oodx")])
    per_rank = [build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=r, world_size=2) for r in range(2)]
    meta = per_rank[0]["metadata"]
    assert meta["num_classes"] == 2 and meta["class_names"] == ["c3", "c1"]
    assert meta["counts"]["test"] == 20 and meta["counts"]["test_unknown"] == 10
    assert meta["counts"]["ood"] == {"oodx": 9}
    assert meta["counts"]["val"] + meta["counts"]["train"] == 20 and meta["counts"]["val"] > 0  # 20 known
    # validation = 2 whole shards of 10 (20 %): it reads nothing else, training never reads them
    val_shards = {s for s in range(10) if per_rank[0]["val"].dataset.plan.kept_in_shard(s)}
    train_shards = {s for s in range(10) if per_rank[0]["train"].dataset.plan.kept_in_shard(s)}
    assert 1 <= len(val_shards) <= 2 and not val_shards & train_shards
    truth_test = expected_labels(sets, "test", {3: 0, 1: 1})
    truth_train = expected_labels(sets, "train", {3: 0, 1: 1})
    seen = {}
    for key in ("val", "train_eval", "test", "ood"):
        ids, labels, batches = [], [], 0
        for rank, loaders in enumerate(per_rank):
            loader = loaders["ood"]["oodx"] if key == "ood" else loaders[key]
            got_ids, got_labels, sizes = collect(loader)
            assert len(sizes) == len(loader) == loader.batches_per_rank()[rank]  # promised before streaming
            assert loader.num_samples == len(got_ids)
            ids += got_ids
            labels += got_labels
            batches += len(sizes)
        assert len(ids) == len(set(ids)), f"{key}: a sample was seen twice"
        seen[key] = dict(zip(ids, labels))
    assert set(seen["test"]) == set(range(40 // 2)) and seen["test"] == truth_test
    assert set(seen["ood"]) == set(range(9)) and set(seen["ood"].values()) == {-1}
    known = {i for i, y in truth_train.items() if y >= 0}
    assert set(seen["val"]) | set(seen["train_eval"]) == known and not set(seen["val"]) & set(seen["train_eval"])
    assert all(truth_train[i] == y for i, y in {**seen["val"], **seen["train_eval"]}.items())


def test_training_gives_every_rank_the_same_number_of_full_batches(sets):
    cfg = config(sets, batch_size=2, num_workers=2)
    per_rank = [build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 7, rank=r, world_size=3) for r in range(3)]
    # 10 shards over 3 ranks: 4/3/3 shards, yet the same batch count everywhere
    val = {i for loaders in per_rank for i in collect(loaders["val"])[0]}
    counts, epochs = [], []
    for loaders in per_rank:
        train = loaders["train"]
        for _ in range(2):
            ids, labels, sizes = collect(train)
            assert set(sizes) == {2}  # partial=False: no batch of 1 for BatchNorm
            assert set(labels) <= {0, 1} and not set(ids) & val
            counts.append(len(sizes))
            epochs.append(ids)
        assert len(train) == counts[-1]
    n_train = per_rank[0]["metadata"]["counts"]["train"]
    assert len(set(counts)) == 1 and counts[0] == n_train // (3 * 2) // 2 * 2 > 0  # per rank // workers x workers
    assert epochs[0] != epochs[1]  # reshuffled between epochs


def test_validation_is_a_stratified_slice_when_there_are_too_few_shards(sets):
    loaders = build_shard_loaders(config(sets, train="few", test="few", val_fraction=0.1), SPLIT, to_tensor,
                                  to_tensor, 0, rank=0, world_size=1, num_workers=0)
    labels = np.load(sets / "few.labels.npy")
    val = collect(loaders["val"])[0]
    assert sorted(labels[val].tolist()) == [1, 3]  # round(0.3) shards = 0: one sample of each known class
    assert not set(val) & set(collect(loaders["train_eval"])[0])


def test_augmented_statistics_set_is_the_same_images_under_the_other_transform(sets):
    """The reference protocol: class statistics from train_eval (test transform), z-norm
    moments from train_eval_augmented, the same samples under the training transform."""
    flipped = lambda image: -to_tensor(image)  # noqa: E731  (stands for the training augmentation)
    cfg = config(sets, num_workers=0)
    loaders = build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1, stats_transform=flipped)
    plain = {int(i): x for images, _, ids in loaders["train_eval"] for x, i in zip(images, ids)}
    augmented = {int(i): x for images, _, ids in loaders["train_eval_augmented"] for x, i in zip(images, ids)}
    assert plain.keys() == augmented.keys() and len(plain) > 0
    assert all(torch.equal(augmented[i], -plain[i]) for i in plain)
    assert build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)["train_eval_augmented"] is None


def test_fewer_shards_than_ranks_x_workers(sets):
    cfg = config(sets, train="few", test="few", num_workers=2)
    with pytest.warns(UserWarning, match="using 1 workers per rank"):
        per_rank = [build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=r, world_size=2) for r in range(2)]
    ids = [i for loaders in per_rank for i in collect(loaders["test"])[0]]
    assert sorted(ids) == list(range(40))
    with pytest.raises(DataError, match=r"3 shards but 4 ranks x 2 workers need at least 8"):
        build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=4)


def _rewrite_shard(path: Path, edit) -> None:
    samples = list(iter_shard(str(path), lambda u, e: None))
    with open(path, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False)
        for sample in samples:
            sample = edit({k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"})
            if sample is not None:
                writer.write(sample)
        writer.close()


def _copy_set(sets: Path, tmp: Path, name: str) -> Path:
    out = tmp / "copy"
    out.mkdir()
    for file in sets.iterdir():
        if file.name.startswith(name + "-") or file.name.startswith(name + "."):
            (out / file.name).write_bytes(file.read_bytes())
    return out


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, format="JPEG")
    return buf.getvalue()[:200]


def test_corrupt_samples_are_skipped_counted_and_stop_the_run_above_the_limit(sets, tmp_path, caplog):
    root = _copy_set(sets, tmp_path, "test")
    index, _ = read_index(str(root / "test"))
    shard = [root / s.name for s in index.shards]
    edits = {  # shard 0: truncated JPEG + missing .cls; shard 1: non-image bytes; shard 6: truncated tar
        0: lambda s: {**s, "png": _truncated_jpeg()} if s["__key__"].endswith("0") else
        {k: v for k, v in s.items() if k != "cls"} if s["__key__"].endswith("1") else s,
        1: lambda s: {**s, "png": b"this is not an image"} if s["__key__"].endswith("3") else s,
    }
    for i, edit in edits.items():
        _rewrite_shard(shard[i], edit)
    data = shard[6].read_bytes()
    shard[6].write_bytes(data[:700])  # last shard (2 samples): header of the first + part of its data
    bad = 2 + 1 + 2
    cfg = config(root, train="test", test="test", num_workers=0)
    cfg.shards.max_corrupt_fraction = 0.5
    loader = build_shard_loaders(cfg, OpenSetSplit("toy", (0, 1, 2, 3)), to_tensor, to_tensor, 0)["test"]
    ids = collect(loader)[0]
    assert len(ids) == 20 - bad and len(set(ids)) == len(ids)
    assert loader.corrupt_counts() == (20, bad)
    assert "corrupt" in caplog.text and "truncated or unreadable shard" in caplog.text
    cfg.shards.max_corrupt_fraction = 0.1
    loader = build_shard_loaders(cfg, OpenSetSplit("toy", (0, 1, 2, 3)), to_tensor, to_tensor, 0)["test"]
    with pytest.raises(DataError, match=r"5 of 20 samples corrupt \(25.0% > data.shards.max_corrupt_fraction=0.1\)"):
        collect(loader)


@pytest.mark.parametrize("member", ["pyd", "pickle", "json"])
def test_pickles_and_unknown_members_are_refused(sets, tmp_path, member):
    root = _copy_set(sets, tmp_path, "test")
    index, _ = read_index(str(root / "test"))
    _rewrite_shard(root / index.shards[2].name, lambda s: {**s, member: b"\x80\x04K\x01."})
    cfg = config(root, train="test", test="test", num_workers=2)
    loader = build_shard_loaders(cfg, OpenSetSplit("toy", (0, 1, 2, 3)), to_tensor, to_tensor, 0)["test"]
    refused = rf"has a '\.{member}' member; cssr-dist .* never unpickles - rebuild with tools/make_shards.py$"
    with pytest.raises(DataError, match=refused):
        collect(loader)  # raised in a worker, re-raised here as one line


def test_missing_or_empty_shard_lists_are_clear_errors(sets, tmp_path):
    with pytest.raises(DataError, match=r"shard index not found \(tried .*nope.json"):
        build_shard_loaders(config(sets, train="nope"), SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)
    with pytest.raises(DataError, match="needs data.shards.test"):
        build_shard_loaders(config(sets, test=None), SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)
    data = json.loads((sets / "test.json").read_text())
    (tmp_path / "empty.json").write_text(json.dumps({**data, "shards": [], "total": 0}))
    with pytest.raises(DataError, match="lists no shards"):
        build_shard_loaders(config(tmp_path, train="empty"), SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)
    cfg = config(sets, ood=[OodSetConfig(name="inat")])
    with pytest.raises(DataError, match=r"data.ood\[0\] \('inat'\) has no 'shards' prefix"):
        build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)


def test_shard_files_are_closed_even_when_an_epoch_stops_mid_shard(sets):
    cfg = config(sets, num_workers=0, batch_size=2)
    gc.collect()  # earlier tests' garbage (their unclosed files, sockets) is not this loader's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaders = build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)
        collect(loaders["test"])
        for _ in zip(range(1), loaders["train"]):  # stop after one batch, mid-shard
            pass
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loaders = build_shard_loaders(config(Path(root), num_workers=0), SPLIT, to_tensor, to_tensor, 0)
        result = {"test": collect(loaders["test"])[0], "train_batches": len(collect(loaders["train"])[2]),
                  "rank": loaders["metadata"]["rank"]}
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_two_real_processes_with_gloo_split_the_test_set(sets, tmp_path):
    out = tmp_path / "gathered.json"
    # spawn, not fork: a child forked after torch or tqdm started threads can deadlock
    mp.start_processes(_rank_main, args=(2, _free_port(), str(sets), str(out)), nprocs=2, start_method="spawn")
    gathered = json.loads(out.read_text())
    assert [g["rank"] for g in gathered] == [0, 1]  # taken from torch.distributed
    ids = gathered[0]["test"] + gathered[1]["test"]
    assert sorted(ids) == list(range(20)) and gathered[0]["test"] and gathered[1]["test"]
    assert gathered[0]["train_batches"] == gathered[1]["train_batches"] > 0


def test_shards_can_be_read_through_file_and_pipe_urls(sets, tmp_path):
    index = json.loads((sets / "test.json").read_text())
    (tmp_path / "test.labels.npy").write_bytes((sets / "test.labels.npy").read_bytes())
    cfg = config(tmp_path, train="test", test="test", num_workers=2)
    cfg.shards.allow_url_schemes = True  # pipe: needs the opt-in (tests/test_reliability_shards.py)
    for base in (f"file:{sets}/", f"pipe:cat {sets}/"):
        (tmp_path / "test.json").write_text(json.dumps({**index, "base_url": base}))
        loaders = build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)
        assert loaders["test"].dataset.plan.urls[0] == base + "test-000000.tar"
        assert sorted(collect(loaders["test"])[0]) == list(range(20))
    index["shards"][3]["name"] = "gone.tar"
    (tmp_path / "test.json").write_text(json.dumps({**index, "base_url": f"file:{sets}/"}))
    with pytest.raises(DataError, match=r"1 of 7 shards listed in .* are missing \(e.g. .*gone.tar\)"):
        build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)
    (tmp_path / "test.json").write_text(json.dumps({**index, "base_url": f"pipe:cat {sets}/"}))
    cfg.shards.max_corrupt_fraction = 0.5  # a failing pipe: its samples are counted as corrupt
    loader = build_shard_loaders(cfg, SPLIT, to_tensor, to_tensor, 0, rank=0, world_size=1)["test"]
    assert len(collect(loader)[0]) == 17 and loader.corrupt_counts() == (20, 3)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile_and_rejects_damage(tmp_path, fmt):
    names = ["000000001.jpg", "000000001.cls", "d/" + "x" * 150 + ".txt", "ünï/000000002.png"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, name in enumerate(names):
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100:
                continue  # ustar stores long paths in its prefix field only when split at a '/'
            info = tarfile.TarInfo(name)
            info.size = 700 * i + 1
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
        tar.addfile(tarfile.TarInfo("somedir"))  # not a regular file: skipped
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    assert list(tar_members(io.BytesIO(data))) == expected and len(expected) >= 3
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(tar_members(io.BytesIO(data[:1000])))
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_members(io.BytesIO(b"<html>" + bytes(600))))


def test_rank_and_world_size_come_from_the_environment_without_torch_distributed(sets, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loaders = build_shard_loaders(config(sets, num_workers=0), SPLIT, to_tensor, to_tensor, 0)
    assert (loaders["metadata"]["rank"], loaders["metadata"]["world_size"]) == (1, 2)
    assert sorted(collect(loaders["test"])[0]) == [i for s in range(1, 7, 2) for i in range(3 * s, 3 * s + 3)]
    with pytest.raises(DataError, match=r"rank 2 is not in 0..1"):
        build_shard_loaders(config(sets), SPLIT, to_tensor, to_tensor, 0, rank=2)


def test_shard_loader_workers_start_from_the_fork_server(sets):
    """As the native reader's (tests/test_loaders.py): never a fork of the rank; a training
    stream's persistent workers and an evaluation loader's read the same ids as without workers."""
    with_workers = build_shard_loaders(config(sets, num_workers=2), SPLIT, to_tensor, to_tensor, 0)
    without = build_shard_loaders(config(sets, num_workers=0), SPLIT, to_tensor, to_tensor, 0)
    for name in ("train", "test"):
        assert with_workers[name]._data_loader().multiprocessing_context.get_start_method() == "forkserver"
        assert without[name]._data_loader().multiprocessing_context is None
    assert sorted(collect(with_workers["test"])[0]) == sorted(collect(without["test"])[0])
    assert len(collect(with_workers["train"])[0]) == len(collect(without["train"])[0])


class WholeTransform:
    """Not a Compose: applied whole, per image. A class of the module, not a lambda: loader workers
    start from a fork server, so their data set is pickled."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, image):
        return self.inner(image)


@pytest.mark.parametrize("workers,tail_in_main", [(0, False), (1, True), (1, False), (2, False)])
def test_uint8_batches_normalised_per_batch_equal_the_per_image_transform(sets, monkeypatch, workers, tail_in_main):
    """A Compose with ToTensor is cut there (data/batch_transform.py); wherever the batch stage
    runs (main process or workers) the numbers are those of the whole per-image transform."""
    from torchvision import transforms as T

    from cssr_dist.data.readers import shards as shards

    monkeypatch.setattr(shards, "main_process_has_a_core", lambda workers: tail_in_main)
    compose = T.Compose([T.Resize((5, 5)), T.ToTensor(), T.Normalize([0.4, 0.5, 0.6], [0.2, 0.3, 0.25])])
    cfg = config(sets, num_workers=workers)

    def by_id(transform, expect_tail_in_main: bool) -> dict[int, torch.Tensor]:
        loader = build_shard_loaders(cfg, SPLIT, transform, transform, 0, rank=0, world_size=1)["test"]
        assert loader.dataset.tail_in_main is expect_tail_in_main
        return {int(i): x for images, _, ids in loader for x, i in zip(images, ids)}

    split = by_id(compose, tail_in_main)
    whole = by_id(WholeTransform(compose), False)
    assert split.keys() == whole.keys() and len(split) == 20
    for key, image in split.items():
        assert image.dtype == torch.float32
        torch.testing.assert_close(image, whole[key], rtol=0, atol=1e-6)
