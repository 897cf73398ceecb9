"""Shared fixtures: tiny data sets written in the real on-disk formats, and small data configs.

Tests load these files through the production readers, so a format regression fails a
test instead of a cluster job.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cssr_dist.config import DataConfig

# Triton decides when it is first imported whether its kernels, its standard library included,
# are interpreted; without CUDA the fused-kernel tests run under the interpreter, so this must
# hold before ANY test module (timm, torch._dynamo, ...) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _rng_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_cifar(root: Path, hundred: bool = False, per_class: int = 2, seed: int = 0) -> Path:
    """cifar-10-batches-py (5 train batches + test) or cifar-100-python, `per_class` images per class per split."""
    n_cls = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "fine_labels" if hundred else "labels"
    files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(files):
        labels = np.repeat(np.arange(n_cls), per_class).tolist()
        data = _rng_images(len(labels), (3 * 32 * 32,), seed + k)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, label_key: labels, "batch_label": name}, fh)
    meta = {"fine_label_names": [f"c100_{i}" for i in range(100)]} if hundred else {"label_names": [f"c10_{i}" for i in range(10)]}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as fh:
        pickle.dump(meta, fh)
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an idx file (uint8), gzipped when the name ends in .gz."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(payload)


def write_mnist_raw(root: Path, folder: str = "MNIST", n_train: int = 30, n_test: int = 20, gz: bool = True) -> Path:
    raw = root / folder / "raw"
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte{ext}", _rng_images(n, (28, 28), n))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n, dtype=np.uint8) % 10)
    return raw


def write_images(folder: Path, names: list[str], size: int = 16, mode: str = "RGB", seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        arr = _rng_images(1, (size, size, 3) if mode == "RGB" else (size, size), seed + i)[0]
        Image.fromarray(arr).save(folder / name)


def write_tinyimagenet(root: Path, wnids: list[str], per_class: int = 2) -> Path:
    base = root / "tiny-imagenet-200"
    lines = []
    for c, wnid in enumerate(wnids):
        write_images(base / "train" / wnid / "images", [f"{wnid}_{i}.JPEG" for i in range(per_class)], 64, seed=c)
        names = [f"val_{c * per_class + i}.JPEG" for i in range(per_class)]
        write_images(base / "val" / "images", names, 64, mode="L" if c == 0 else "RGB", seed=100 + c)
        lines += [f"{n}\t{wnid}\t0\t0\t63\t63" for n in names]
    (base / "val" / "val_annotations.txt").write_text("\n".join(reversed(lines)) + "\n")
    return base


@pytest.fixture
def tiny() -> SimpleNamespace:
    """Writers of tiny data sets in the official layouts (call them with a tmp_path)."""
    return SimpleNamespace(cifar=write_cifar, idx=write_idx, mnist_raw=write_mnist_raw, images=write_images,
                           tinyimagenet=write_tinyimagenet)


@pytest.fixture
def data_cfg():
    """DataConfig factory with test-friendly defaults (no workers, small caps)."""

    def make(**kwargs) -> DataConfig:
        base = dict(num_workers=0, batch_size=16, eval_batch_size=32, root="/nonexistent-data-root")
        base.update(kwargs)
        return DataConfig(**base)

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures(...)`): on a busy
    2-core box a second OpenMP thread stalls every op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: Files whose every test performs a fault or attack of docs/reliability.md (`pytest -m faults`).
FAULT_FILES = ("test_reliability_", "test_resume.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Mark the fault-injection suite so a reader runs it with one command: `pytest -m faults`."""
    for item in items:
        if item.path.name.startswith(FAULT_FILES):
            item.add_marker(pytest.mark.faults)
