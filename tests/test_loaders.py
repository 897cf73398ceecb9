"""Open-set views, stratified subsets, and `build_run_data`: this rank's share of every set."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types

import numpy as np
import psutil
import pytest
import torch

from cssr_dist.config import OodSetConfig
from cssr_dist.data.readers import build_run_data
from cssr_dist.data.readers.base import WORKER_TIMEOUT_S
from cssr_dist.data.open_set import OpenSetConcat, OpenSetDataset, per_class_subset, train_val_split
from cssr_dist.data.sources import ArraySource
from cssr_dist.data.splits import OpenSetSplit
from cssr_dist.errors import DataError
from cssr_dist.stacks import STACK_SIGNAL
from tests.helpers import kill_tree, run_session
from tests.helpers import test_env as run_env


def _source(targets, classes=None):
    targets = np.asarray(targets)
    images = np.zeros((len(targets), 4, 4), np.uint8) + targets.clip(0)[:, None, None].astype(np.uint8)
    return ArraySource("fake", images, targets, classes or [f"k{i}" for i in range(int(targets.max()) + 1)])


def test_roles_filter_and_label():
    src = _source([0, 1, 2, 3, 0, 1, 2, 3])
    split = OpenSetSplit("fake", (2, 0), unknown=(3,))
    train = OpenSetDataset(src, split, role="train")
    assert train.indices.tolist() == [0, 2, 4, 6] and train.labels.tolist() == [1, 0, 1, 0]
    assert train.known_class_names == ["k2", "k0"]
    test = OpenSetDataset(src, split, role="test")  # class 1 is neither known nor unknown -> dropped
    assert test.indices.tolist() == [0, 2, 3, 4, 6, 7] and test.labels.tolist() == [1, 0, -1, 1, 0, -1]
    assert test.unknown_class_names == ["k3"]
    img, label, sid = test[2]
    assert (label, sid) == (-1, 3) and int(np.asarray(img).max()) == 3
    sub = OpenSetDataset(src, split, indices=[1, 2, 3], role="train")  # indices are filtered by role too
    assert sub.ids.tolist() == [2] and sub.labels.dtype == np.int64
    assert test.original_labels_of([7, 0, 3]).tolist() == [3, 0, 3]
    with pytest.raises(DataError, match="do not belong"):
        test.original_labels_of([1])
    with pytest.raises(DataError, match="role"):
        OpenSetDataset(src, split, role="holdout")


def test_unknown_and_ood_roles_and_concat():
    split = OpenSetSplit("a", (0, 1), unknown=(5, 6), unknown_dataset="b")
    primary = OpenSetDataset(_source([0, 1, 2, 3]), split, role="test")
    assert primary.indices.tolist() == [0, 1]  # CIFAR+N: the primary set gives known classes only
    other = OpenSetDataset(_source([4, 5, 6, 7, 5]), split, role="unknown", id_offset=4)
    assert other.ids.tolist() == [5, 6, 8] and other.labels.tolist() == [-1, -1, -1]
    both = OpenSetConcat([primary, other])
    assert len(both) == 5 and both.labels.tolist() == [0, 1, -1, -1, -1]
    assert [both[i][2] for i in range(5)] == [0, 1, 5, 6, 8]
    assert both.original_labels_of([8, 0]).tolist() == [5, 0]
    ood = OpenSetDataset(_source([-1, -1, -1], ["x"]), split, role="ood")
    assert ood.labels.tolist() == [-1, -1, -1]
    with pytest.raises(DataError, match="unlabelled"):
        OpenSetDataset(_source([-1, -1], ["x"]), split, role="test")
    with pytest.raises(DataError, match="overlap"):
        OpenSetConcat([primary, primary])


def test_per_class_subset_is_seeded_and_capped():
    targets = np.repeat(np.arange(4), 10)
    a = per_class_subset(targets, 3, seed=0)
    assert np.bincount(targets[a]).tolist() == [3, 3, 3, 3] and np.all(np.diff(a) > 0)
    assert np.array_equal(a, per_class_subset(targets, 3, seed=0))
    assert not np.array_equal(a, per_class_subset(targets, 3, seed=1))
    assert per_class_subset(targets, None, seed=0).tolist() == list(range(40))
    b = per_class_subset(targets, 50, seed=0, indices=np.arange(0, 40, 2))
    assert b.tolist() == list(range(0, 40, 2))


def test_train_val_split_disjoint_stratified():
    targets = np.repeat(np.arange(5), [100, 50, 20, 2, 1])
    known = np.flatnonzero(targets != 4)
    train, val = train_val_split(known, targets, 0.1, seed=0)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), known)
    assert np.bincount(targets[val], minlength=5).tolist() == [10, 5, 2, 1, 0]
    assert np.array_equal(val, train_val_split(known, targets, 0.1, seed=0)[1])
    assert not np.array_equal(val, train_val_split(known, targets, 0.1, seed=1)[1])
    assert train_val_split(known, targets, 0.0, seed=0)[1].size == 0


class _Views:
    """The open-set views behind a RunData's loaders (single process), for assertions."""

    def __init__(self, data):
        self.split, self.num_classes = data.meta.split, data.meta.num_classes
        self.class_names, self.counts = data.meta.class_names, data.meta.counts
        self.original_class_names = data.meta.original_class_names
        self.train = data.train.samples.dataset
        self.val = data.val.dataset if data.val is not None else None
        self.train_eval, self.test = data.train_eval.dataset, data.test.dataset
        self.ood = {name: loader.dataset for name, loader in data.ood.items()}


def _views(data) -> _Views:
    return _Views(data)


def test_build_datasets_fashion_mnist(data_cfg):
    cfg = data_cfg(train_per_class=20, test_per_class=10, stats_per_class=5, val_fraction=0.25)
    bundle = _views(build_run_data(cfg, seed=0))
    assert bundle.num_classes == 6 and bundle.class_names[:2] == ["T-shirt/top", "Trouser"]
    assert len(bundle.train) == 6 * 15 and len(bundle.val) == 6 * 5 and len(bundle.train_eval) == 6 * 5
    assert set(bundle.train.labels.tolist()) == set(range(6))
    assert np.intersect1d(bundle.train.ids, bundle.val.ids).size == 0
    assert set(bundle.train_eval.ids.tolist()) <= set(bundle.train.ids.tolist())
    assert bundle.counts["test_known"] == 60 and bundle.counts["test_unknown"] == 40
    assert set(bundle.test.original_labels[bundle.test.labels < 0].tolist()) == {6, 7, 8, 9}
    x, y, i = bundle.train_eval[0]
    assert x.shape == (1, 28, 28) and x.abs().max() <= 2.0 + 1e-6  # test transform: no contrast factor
    assert np.array_equal(_views(build_run_data(cfg, seed=0)).val.ids, bundle.val.ids)


def test_cifar_plus10_bundle(tmp_path, tiny, data_cfg):
    tiny.cifar(tmp_path, per_class=2)
    tiny.cifar(tmp_path, hundred=True, per_class=3)
    cfg = data_cfg(root=str(tmp_path), dataset="cifar_plus10", split_family="arpl", split="0",
                   image_size=32, in_chans=3, mean=[0.5] * 3, std=[0.25] * 3, val_fraction=0.0)
    data = build_run_data(cfg, seed=0)
    bundle = _views(data)
    assert bundle.split.known == (4, 7, 9, 1) and bundle.val is None
    assert len(bundle.train) == 4 * 10 and bundle.class_names == ["c10_4", "c10_7", "c10_9", "c10_1"]
    test = bundle.test
    assert (test.labels >= 0).sum() == 4 * 2 and (test.labels < 0).sum() == 10 * 3
    assert len(np.unique(test.ids)) == len(test) and test.ids.min() >= 0
    unknown_orig = test.original_labels[test.labels < 0]
    assert sorted(set(unknown_orig.tolist())) == sorted([30, 25, 1, 9, 8, 0, 46, 52, 49, 71])
    assert bundle.original_class_names[30] == "c100_30"
    ids = torch.cat([b[2] for b in data.test])
    assert sorted(ids.tolist()) == sorted(test.ids.tolist())


def test_ood_sets_from_config_and_split_file(tmp_path, tiny, data_cfg):
    for sub in ("train", "val"):
        for c in ("n1", "n2", "n3"):
            tiny.images(tmp_path / sub / c, [f"{i}.png" for i in range(4)], size=20)
    tiny.images(tmp_path / "oodinaturalist" / "x", ["a.png", "b.png"], size=24)
    tiny.images(tmp_path / "textures", ["t.png"], size=40)
    spec = {"train": [{"dataset": "imagenet", "convert_class": [0, 1, 2], "keep_class": [0, 1, 2]}],
            "test": [{"dataset": "imagenet", "convert_class": [0, 1, 2], "keep_class": [0, 1, 2]},
                     {"dataset": "oodinaturalist", "convert_class": [-1, -1, -1], "keep_class": [-1]}]}
    (tmp_path / "spl.json").write_text(json.dumps(spec))
    cfg = data_cfg(root=str(tmp_path), dataset="imagenet", split_file=str(tmp_path / "spl.json"), image_size=16,
                   in_chans=3,
                   mean=[0.5] * 3, std=[0.25] * 3, train_augment="imagenet", val_fraction=0.25, batch_size=4,
                   ood=[OodSetConfig(name="textures", source="oodfolder", root=str(tmp_path / "textures"))])
    loaders = build_run_data(cfg, seed=0)
    bundle = _views(loaders)
    assert bundle.num_classes == 3 and list(bundle.ood) == ["textures", "oodinaturalist"]
    assert len(bundle.ood["oodinaturalist"]) == 2 and bundle.ood["textures"].labels.tolist() == [-1]
    assert (bundle.test.labels >= 0).all() and len(bundle.test) == 12
    assert loaders.meta.ood_groups == {"textures": "far", "oodinaturalist": "far"}
    x, y, i = next(iter(loaders.ood["oodinaturalist"]))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [-1, -1] and i.dtype == torch.int64
    x, y, i = next(iter(loaders.train))
    assert x.shape == (4, 3, 16, 16) and len(loaders.train) == 9 // 4


@pytest.fixture
def small_bundle_cfg(data_cfg):
    return data_cfg(train_per_class=10, test_per_class=4, val_fraction=0.2, batch_size=16)


def test_run_data_contract(small_bundle_cfg):
    cfg = small_bundle_cfg
    loaders = build_run_data(cfg, seed=0)
    bundle = _views(loaders)
    assert len(loaders.train) == len(bundle.train) // 16  # drop_last
    batches = list(loaders.train)
    images, labels, ids = batches[0]
    assert images.shape == (16, 1, 28, 28) and labels.dtype == torch.int64 and ids.dtype == torch.int64
    first = torch.cat([b[2] for b in batches])
    second = torch.cat([b[2] for b in build_run_data(cfg, seed=0).train])
    assert torch.equal(first, second)  # seeded shuffle
    assert not torch.equal(first, torch.sort(first).values)
    loaders.train.set_epoch(1)
    assert not torch.equal(first, torch.cat([b[2] for b in loaders.train]))  # a new order per epoch
    loaders.train.set_epoch(0)
    resumed = torch.cat([b[2] for b in loaders.train.iter_from(2)])
    assert torch.equal(resumed, first[2 * 16:])  # resume mid-epoch at the same position
    test_ids = torch.cat([b[2] for b in loaders.test])
    assert torch.equal(test_ids, torch.from_numpy(bundle.test.ids))  # not shuffled, complete
    assert loaders.test.drop_last is False and loaders.meta.num_classes == 6


def test_ranks_share_the_sets_exactly(small_bundle_cfg):
    """Two ranks: training batches are the single-process global order cut by rank; every
    evaluation sample is on exactly one rank."""
    cfg = small_bundle_cfg
    cfg.batch_size = 8
    single = build_run_data(cfg, seed=0)
    ranks = [build_run_data(cfg, seed=0, rank=r, world=2) for r in range(2)]
    cfg.batch_size = 8
    assert len(ranks[0].train) == len(ranks[1].train) == len(single.train) // 2
    one = [b[2] for b in single.train]
    for r, data in enumerate(ranks):
        assert all(torch.equal(b[2], one[2 * i + r]) for i, b in enumerate(data.train))
    test = [torch.cat([b[2] for b in data.test]) for data in ranks]
    assert sorted(torch.cat(test).tolist()) == sorted(_views(single).test.ids.tolist())
    assert not set(test[0].tolist()) & set(test[1].tolist())
    with pytest.raises(DataError, match="rank 2 is not in 0..1"):
        build_run_data(cfg, seed=0, rank=2, world=2)


def test_loader_options_and_errors(small_bundle_cfg):
    cfg = small_bundle_cfg
    cfg.num_workers = 1
    assert build_run_data(cfg, seed=0).train._loader.persistent_workers is True
    cfg.batch_size = 1000
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_run_data(cfg, seed=0)


def test_loader_workers_start_from_the_fork_server_and_read_what_the_main_process_reads(small_bundle_cfg):
    """Workers are never forked from the rank itself (readers/base.py::WORKER_START_METHOD: a rank
    has threads, and a child forked while one of them holds the interpreter's thread-list lock
    hangs): every loader with workers names the fork server, and its batches equal those read
    without workers."""
    cfg = small_bundle_cfg
    plain = build_run_data(cfg, seed=0)
    cfg.num_workers = 1
    data = build_run_data(cfg, seed=0)
    for loader in (data.train._loader, data.val, data.train_eval, data.test):
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
        assert loader.timeout == WORKER_TIMEOUT_S
    assert plain.test.multiprocessing_context is None and plain.test.timeout == 0
    for with_workers, without in ((data.train, plain.train), (data.test, plain.test)):
        for (x, y, ids), (x0, y0, ids0) in zip(with_workers, without, strict=True):
            assert torch.equal(ids, ids0) and torch.equal(y, y0) and torch.equal(x, x0)
    data.train.set_epoch(1)  # the epoch reaches the persistent workers (shared memory, not a fork's copy)
    plain.train.set_epoch(1)
    assert [b[2].tolist() for b in data.train] == [b[2].tolist() for b in plain.train]


#: A process whose C threads keep entering Python (each entry makes and deletes a thread state
#: under the interpreter's thread-list lock, without the GIL: as, most likely, torch's and gloo's threads do
#: when they release a tensor) while it starts loader workers again and again.
FOREIGN_THREADS_SCRIPT = """
import ctypes, ctypes.util, sys, threading
import torch
from torch.utils.data import TensorDataset
from cssr_dist.data.readers.native import eval_loader

libc = ctypes.CDLL(ctypes.util.find_library("c"))
enter_python = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(lambda arg: None)

def churn(stop):
    tid = ctypes.c_ulong()
    while not stop.is_set():
        libc.pthread_create(ctypes.byref(tid), None, enter_python, None)
        libc.pthread_join(tid, None)

if __name__ == "__main__":
    stop = threading.Event()
    threads = [threading.Thread(target=churn, args=(stop,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    data = TensorDataset(torch.arange(8.0))
    for _ in range(int(sys.argv[1])):
        assert sum(len(batch[0]) for batch in eval_loader(data, 4, 2, 0, 1)) == 8
    stop.set()
    for thread in threads:
        thread.join()
    print("started", sys.argv[1], "loaders")
"""


@pytest.mark.slow
def test_loader_workers_start_while_other_threads_enter_python(tmp_path):
    """200 loaders x 2 workers in a process whose C threads keep entering Python. Forked from that
    process (the start method before), a worker could inherit the interpreter's thread-list lock
    held and hang in `PyOS_AfterFork_Child`: measured, 3 of 5 runs of 100 loaders hung. From the
    fork server: every worker starts (~0.2 s per loader with 2 workers on the 2-core VM)."""
    script = tmp_path / "foreign_threads.py"
    script.write_text(FOREIGN_THREADS_SCRIPT)
    out = run_session([sys.executable, str(script), "200"], run_env(tmp_path), timeout=240)
    assert out.returncode == 0 and "started 200 loaders" in out.stdout, out.stderr[-3000:]


#: One loader worker that takes 2 s per sample, so it is alive and busy when it is signalled.
SLOW_WORKER_SCRIPT = """
import sys, time
from torch.utils.data import Dataset
from cssr_dist.data.readers.native import eval_loader

class SlowSamples(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        time.sleep(2)
        return index

if __name__ == "__main__":
    print("read", sum(len(batch) for batch in eval_loader(SlowSamples(), 1, 1, 0, 1)), flush=True)
"""


@pytest.mark.slow
def test_a_loader_worker_prints_its_stack_on_the_stack_signal_and_goes_on(tmp_path):
    """Workers start from a fork server and inherit nothing from the rank, so each registers
    `STACK_SIGNAL` itself (its worker_init_fn): signalled mid-read it prints where it is and the
    loader still delivers every sample (without the registration SIGUSR2 kills the worker)."""
    script = tmp_path / "slow_worker.py"
    script.write_text(SLOW_WORKER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], env=run_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        worker = None
        while worker is None and time.monotonic() < deadline:  # the fork server's child is the worker
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.ppid() != proc.pid]
            worker = workers[0] if workers else None
            time.sleep(0.2)
        assert worker is not None, "no loader worker started"
        time.sleep(3)  # inside __getitem__ by now
        worker.send_signal(STACK_SIGNAL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 0 and out.strip() == "read 4", err[-3000:]
    assert "in __getitem__" in err and "slow_worker.py" in err, err[-3000:]


def test_shards_format_dispatch(monkeypatch, data_cfg):
    seen = {}
    fake = types.ModuleType("cssr_dist.data.readers.shards")
    fake.read = lambda cfg, seed, rank, world, **kw: seen.update(seed=seed, rank=rank) or types.SimpleNamespace(name="R")
    monkeypatch.setitem(sys.modules, "cssr_dist.data.readers.shards", fake)
    cfg = data_cfg(format="shards", dataset="cifar10", split_family="cssr", split="b")
    assert build_run_data(cfg, seed=7, rank=1, world=2).name == "R"
    assert seen == {"seed": 7, "rank": 1}


def test_keep_last_batch_every_image_once_and_no_batch_of_one(data_cfg):
    """data.drop_last=false (the reference protocol): N = k x batch + 1 images train every one
    of them once per epoch; the lone last image joins the batch before it, so a BatchNorm over a
    1 x 1 map (which cannot normalise one image) trains without error."""
    cfg = data_cfg(train_per_class=11, val_fraction=0.0, batch_size=13, drop_last=False)  # 66 = 5 x 13 + 1
    data = build_run_data(cfg, seed=0)
    every = np.sort(data.train.samples.dataset.ids)
    assert len(every) == 66 and len(data.train) == 5
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 28), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 6)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.zeros(1, 1, 28, 28))  # what a batch of one would do
    for epoch in range(2):
        data.train.set_epoch(epoch)
        sizes, ids = [], []
        for images, labels, batch_ids in data.train:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sizes.append(len(batch_ids))
            ids.append(batch_ids)
        assert sizes == [13, 13, 13, 13, 14]
        assert torch.equal(torch.sort(torch.cat(ids)).values, torch.from_numpy(every))  # each image once
    resumed = [len(b[2]) for b in data.train.iter_from(3)]
    assert resumed == [13, 14]
    # a longer tail is kept as it is (the reference's partial last batch); the default drops it
    cfg = data_cfg(train_per_class=11, val_fraction=0.0, batch_size=16, drop_last=False)  # 66 = 4 x 16 + 2
    assert [len(b[2]) for b in build_run_data(cfg, seed=0).train] == [16, 16, 16, 16, 2]
    cfg.drop_last = True
    assert [len(b[2]) for b in build_run_data(cfg, seed=0).train] == [16, 16, 16, 16]


def test_keep_last_batch_on_two_ranks_equal_full_batches(data_cfg):
    """Two ranks keep Accelerate's even_batches: both take the same number of full batches; the
    last global batch is topped up from the start of the epoch, so every image trains."""
    cfg = data_cfg(train_per_class=11, val_fraction=0.0, batch_size=13, drop_last=False)  # 66 = 2 x 26 + 14
    ranks = [build_run_data(cfg, seed=0, rank=r, world=2) for r in range(2)]
    batches = [[b[2] for b in data.train] for data in ranks]
    assert len(ranks[0].train) == len(ranks[1].train) == len(batches[0]) == len(batches[1]) == 3
    assert all(len(b) == 13 for rank in batches for b in rank)
    seen = torch.cat([b for rank in batches for b in rank])
    assert set(seen.tolist()) == set(ranks[0].train.samples.dataset.ids.tolist())  # every image, 12 twice
    assert len(seen) - len(set(seen.tolist())) == 2 * 3 * 13 - 66
