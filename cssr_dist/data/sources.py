"""Raw data sets on disk -> `Dataset` of (PIL.Image, original_label), with `.targets` and `.classes`.

Each format is read directly (not through torchvision's dataset classes) so that small
test files in the official layouts load through the same code as the real data, without
torchvision's checksum checks; torchvision is used only to download when
`data.download` is true. Folders (ImageFolder, Tiny-ImageNet, OOD folders) are listed by
data/layouts.py, the same listing make_shards writes shards from. Labels are the ORIGINAL ones (torchvision order; sorted wnids
for Tiny-ImageNet / ImageNet); mapping to open-set labels is `OpenSetDataset`'s job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from . import builtin_data, layouts
from .splits import is_ood_name

IMG_EXTENSIONS = layouts.IMAGE_SUFFIXES
SOURCES = ("mnist", "fashion_mnist", "animal_mnist", "cifar10", "cifar100", "svhn", "tinyimagenet", "imagenet", "imagefolder", "oodfolder")


class ArraySource(Dataset):
    """Images held in memory as uint8 [N,H,W] (grey) or [N,H,W,3] (RGB)."""

    def __init__(self, name: str, images: np.ndarray, targets: np.ndarray, classes: list[str]) -> None:
        self.name = name
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.targets[index])


class FileSource(Dataset):
    """Images read from files on demand (Tiny-ImageNet, ImageFolder, OOD folders), as RGB."""

    def __init__(self, name: str, paths: list[Path] | list[str], targets: np.ndarray, classes: list[str]) -> None:
        self.name = name
        self.paths = [str(p) for p in paths]  # str, not Path: smaller when copied to workers
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        """An image that cannot be decoded (truncated, not an image, over PIL's pixel limit) stops
        the run with one line naming the file: a training set silently smaller than the one the
        run records would be lost data."""
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), int(self.targets[index])
        except layouts.IMAGE_READ_ERRORS as err:
            raise DataError(f"image {path} of data set {self.name!r} cannot be read ({type(err).__name__}: "
                            f"{str(err)[:120]}); replace or remove the file, then start the run again") from None


def _missing(what: str, path: Path, how: str) -> DataError:
    return DataError(f"{what} not found: {path} is missing; {how}")


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100 (python pickles)
def _cifar(name: str, root: Path, train: bool, download: bool) -> ArraySource:
    ten = name == "cifar10"
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    files = ([f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]) if ten else ["train" if train else "test"]
    meta = folder / ("batches.meta" if ten else "meta")
    if download and not all((folder / f).is_file() for f in [*files, meta.name]):
        builtin_data.torchvision_download("CIFAR10" if ten else "CIFAR100", root, train=train)
    images, labels = [], []
    for file in files:
        if not (folder / file).is_file():
            raise _missing(name.upper(), folder / file, "set data.download=true or extract the python version of the archive into data.root")
        batch = builtin_data.read_cifar_batch(folder / file)
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch["labels" if ten else "fine_labels"])
    names_key = "label_names" if ten else "fine_label_names"
    classes = builtin_data.read_cifar_batch(meta)[names_key] if meta.is_file() else []
    data = np.concatenate(images).transpose(0, 2, 3, 1).copy()
    return ArraySource(name, data, np.asarray(labels), classes or [str(i) for i in range(10 if ten else 100)])


# ---------------------------------------------------------------- SVHN (.mat)
def _svhn(root: Path, train: bool, download: bool) -> ArraySource:
    path = root / ("train_32x32.mat" if train else "test_32x32.mat")
    if not path.is_file() and download:
        builtin_data.torchvision_download("SVHN", root, train=train)
    if not path.is_file():
        raise _missing("SVHN", path, "set data.download=true or put train_32x32.mat / test_32x32.mat in data.root")
    from scipy.io import loadmat  # start-up time: scipy only for SVHN's .mat files

    mat = loadmat(str(path))
    images = np.ascontiguousarray(np.transpose(mat["X"], (3, 0, 1, 2)), dtype=np.uint8)
    labels = mat["y"].astype(np.int64).reshape(-1)
    labels[labels == 10] = 0  # the .mat files label digit 0 as 10 (torchvision does the same fix)
    return ArraySource("svhn", images, labels, [str(i) for i in range(10)])


# ---------------------------------------------------------------- MNIST / Fashion-MNIST (idx)
def _mnist_like(name: str, root: Path, train: bool, download: bool) -> ArraySource:
    if name == "mnist":
        images, labels = builtin_data.load_mnist(root, train, download)
        source = ArraySource(name, images, labels, builtin_data.MNIST_CLASSES)
        folder = builtin_data.find_mnist(root, train)
    else:
        images, labels = builtin_data.load_fashion_mnist(root, train, download)
        source = ArraySource(name, images, labels, builtin_data.FASHION_MNIST_CLASSES)
        folder = builtin_data.find_fashion_mnist(root, train)
    builtin_data.announce_fallback(root, name, folder)
    source.origin = str(folder)  # the folder really read: summary.json's counts.source
    return source


def _animal_mnist() -> ArraySource:
    """Animal-MNIST (animal-mnist package): an OOD-only set, so every label is -1 and `train` is moot.

    Its 10 animal classes never meet a split; -1 also lets `test_per_class` cap the set's
    total, as for every OOD set. The animals stay in `animal_labels` for whoever wants them.
    """
    images, labels = builtin_data.load_animal_mnist()
    source = ArraySource("animal_mnist", images, np.full(len(labels), -1, dtype=np.int64), [])
    source.animal_labels = labels
    return source


# ---------------------------------------------------------------- folders (data/layouts.py: one listing per layout)
def _file_source(name: str, listing: layouts.Listing) -> FileSource:
    """A listing as a data set; classes are the folder names (wnids), as the model's labels follow them."""
    paths = [record.ref for record in listing.records]
    targets = np.asarray([record.label for record in listing.records], dtype=np.int64)
    return FileSource(name, paths, targets, listing.wnids or listing.classes)


def _image_folder(name: str, root: Path, train: bool) -> FileSource:
    """`root/train|val/<class>/` when those exist (ImageNet layout), else `root/<class>/`."""
    sub = root / ("train" if train else "val")
    folder = sub if sub.is_dir() or name == "imagenet" else root
    if not folder.is_dir():
        raise _missing(name, folder, f"put the images in {root}/{{train,val}}/<class>/ (ImageFolder layout)")
    return _file_source(name, layouts.list_imagefolder(folder, name, "train" if train else "val"))


def _tiny_root(root: Path) -> Path:
    return root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root


def _tinyimagenet(root: Path, train: bool) -> FileSource:
    base = _tiny_root(root)
    how = "download tiny-imagenet-200.zip and extract it into data.root"
    if not (base / "train").is_dir():
        raise _missing("Tiny-ImageNet", root / "tiny-imagenet-200" / "train", how)
    if not train and not (base / "val" / "val_annotations.txt").is_file():
        raise _missing("Tiny-ImageNet validation labels", base / "val" / "val_annotations.txt", how)
    return _file_source("tinyimagenet", layouts.list_tinyimagenet(base, "train" if train else "val"))


def _ood_folder(name: str, root: Path) -> FileSource:
    """Every image under root, at any depth, in the listing's order; all unknown (label -1)."""
    if not root.is_dir():
        raise _missing(f"OOD set '{name}'", root, f"put its images under {root} or set the data.ood entry's root")
    return _file_source(name, layouts.list_ood(root, name))


# ---------------------------------------------------------------- entry point
_BUILDERS: dict[str, Callable[[Path, bool, bool], Dataset]] = {
    "mnist": lambda r, t, d: _mnist_like("mnist", r, t, d),
    "fashion_mnist": lambda r, t, d: _mnist_like("fashion_mnist", r, t, d),
    "animal_mnist": lambda r, t, d: _animal_mnist(),
    "cifar10": lambda r, t, d: _cifar("cifar10", r, t, d),
    "cifar100": lambda r, t, d: _cifar("cifar100", r, t, d),
    "svhn": _svhn,
    "tinyimagenet": lambda r, t, d: _tinyimagenet(r, t),
    "imagenet": lambda r, t, d: _image_folder("imagenet", r, t),
    "imagefolder": lambda r, t, d: _image_folder("imagefolder", r, t),
}


def build_source(name: str, root: str | Path, train: bool, download: bool = False) -> Dataset:
    """Load data set `name` from `root`; yields (PIL.Image, original_label) and has `.targets`, `.classes`.

    `oodfolder` and any name starting with `ood` (e.g. `oodinaturalist`) is a folder of
    images that are all unknown (label -1); `train` is ignored for those. `animal_mnist` is
    a built-in OOD-only set (labels -1, root unused). Any other source also serves as a
    `data.ood` entry (e.g. `source: mnist`: the MNIST test digits): the OOD role turns its
    labels into -1, and `test_per_class` then caps each of its original classes.
    """
    root = Path(root).expanduser()
    if name == "oodfolder" or is_ood_name(name):
        return _ood_folder(name, root)
    if name not in _BUILDERS:
        raise DataError(f"unknown data source {name!r}; valid: {', '.join(SOURCES)} or ood<name> for an OOD image folder")
    return _BUILDERS[name](root, train, download)
