"""Open-set class splits: which original classes are known (and in which order), which are unknown.

One object, `OpenSetSplit`, describes a split whatever its origin: the published split
families (`splits.json`, shipped inside this package so runs never depend on the
project's shared folder), explicit `data.known` / `data.unknown` lists, or a split file in
the CSSR reference format (`exps/<dataset>/spl_<s>.json`) that existing users have.
Results are only comparable between runs of the same split family, so the split's name
records the family.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

#: Number of original classes of the data sets whose class count is fixed. Not `imagenet`: any
#: ImageNet-layout tree (a subset, ImageNet-100, a 3-class test tree) counts its class folders or
#: its shard index, as `imagefolder` does; the name stays what the user chose (W&B group, sweeps).
NUM_CLASSES: dict[str, int] = {
    "mnist": 10,
    "fashion_mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
    "svhn": 10,
    "tinyimagenet": 200,
}

#: Data set names that the CSSR reference split files use.
REFERENCE_DATASETS = ("cifar10", "cifar100", "svhn", "tinyimagenet", "imagenet", "oodinaturalist", "mnist", "fashion_mnist")

FAMILIES = ("builtin", "cssr", "arpl", "none")

#: Split names of the built-in family: five splits per data set, "default" is another name for "0"
#: (kept so existing run names and configs stay valid). Fashion-MNIST split 0: T-shirt, Trouser,
#: Pullover, Dress, Coat, Sandal known; Shirt, Sneaker, Bag, Ankle boot unknown.
BUILTIN_SPLITS = ("0", "1", "2", "3", "4")


def is_ood_name(name: str) -> bool:
    """OOD-only sets (every image unknown) are named `ood<something>`, as in the reference code."""
    return name.startswith("ood")


@dataclass(frozen=True)
class OpenSetSplit:
    """Known classes (ORIGINAL labels, known class i = known[i]) and the unknowns of the test set.

    unknown: original classes whose test images are unknown; None = every non-known class.
    unknown_dataset: when set (CIFAR+N), unknowns come from that data set's TEST images of the
    `unknown` classes and the primary data set contributes known classes only.
    ood_datasets: extra unknown-only sets, each evaluated separately.
    """

    dataset: str
    known: tuple[int, ...]
    unknown: tuple[int, ...] | None = None
    unknown_dataset: str | None = None
    ood_datasets: tuple[str, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "known", tuple(int(k) for k in self.known))
        if self.unknown is not None:
            object.__setattr__(self, "unknown", tuple(int(u) for u in self.unknown))
        object.__setattr__(self, "ood_datasets", tuple(self.ood_datasets))
        where = f"split '{self.name or self.dataset}'"
        if not self.known:
            raise DataError(f"{where} has no known classes; list at least one in data.known")
        if len(set(self.known)) != len(self.known) or min(self.known) < 0:
            raise DataError(f"{where}: known classes {list(self.known)} must be distinct non-negative labels")
        if self.unknown is not None:
            if len(set(self.unknown)) != len(self.unknown) or (self.unknown and min(self.unknown) < 0):
                raise DataError(f"{where}: unknown classes {list(self.unknown)} must be distinct non-negative labels")
            overlap = set(self.known) & set(self.unknown)
            if self.unknown_dataset is None and overlap:
                raise DataError(f"{where}: classes {sorted(overlap)} are both known and unknown")

    @property
    def num_known(self) -> int:
        return len(self.known)

    def label_of(self, orig: int) -> int:
        """Open-set label of an original label of the primary data set: 0..K-1, or -1."""
        try:
            return self.known.index(int(orig))
        except ValueError:
            return -1

    def label_map(self, num_original_classes: int) -> np.ndarray:
        """int64 lookup table original -> open-set label (-1 for every non-known class)."""
        if max(self.known) >= num_original_classes:
            raise DataError(
                f"split '{self.name}' needs class {max(self.known)}, but the '{self.dataset}' data has "
                f"{num_original_classes} classes (0..{num_original_classes - 1}); {self.fix_hint(num_original_classes)}"
            )
        table = np.full(num_original_classes, -1, dtype=np.int64)
        table[list(self.known)] = np.arange(len(self.known), dtype=np.int64)
        return table

    def fix_hint(self, num_original_classes: int) -> str:
        """What to change when this split does not fit the data: the setting that made it (its
        name records the origin: custom/ = data.known, file/ = data.split_file, else the family)."""
        family = self.name.split("/", 1)[0]
        if family == "custom":
            return f"list classes in 0..{num_original_classes - 1} in data.known"
        if family == "file":
            return "data.split_file is a split of a larger data set: drop it (data.split_file=null) or pass one of this data"
        if family in FAMILIES:
            return (f"split family '{family}' is for the full data set: set data.split_family=none (every class "
                    "known) or list the known classes in data.known")
        return "check data.known, data.split_file and data.split_family"

    def primary_test_classes(self, num_original_classes: int) -> np.ndarray:
        """Original classes of the primary data set kept in the test set (known + its unknowns)."""
        keep = np.zeros(num_original_classes, dtype=bool)
        keep[list(self.known)] = True
        if self.unknown_dataset is None:
            if self.unknown is None:
                keep[:] = True
            else:
                keep[[u for u in self.unknown if u < num_original_classes]] = True
        return np.flatnonzero(keep)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the run folder, so a run records exactly which classes it used."""
        out = asdict(self)
        out["known"] = list(self.known)
        out["unknown"] = None if self.unknown is None else list(self.unknown)
        out["ood_datasets"] = list(self.ood_datasets)
        return out


# ---------------------------------------------------------------- published split families
@lru_cache(maxsize=1)
def _splits_table() -> dict:
    return json.loads(resources.files(__package__).joinpath("splits.json").read_text())


def _invalid(what: str, value: object, valid: list[str]) -> DataError:
    return DataError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def _arpl_index(split: str | int, where: str) -> int:
    valid = [str(i) for i in range(5)]
    if str(split) not in valid:
        raise _invalid(f"split for {where}", split, valid)
    return int(split)


def _pick(table: dict, dataset: str, split: str | int, where: str) -> list[int]:
    if dataset not in table:
        raise _invalid(f"dataset for split family '{where}'", dataset, list(table))
    entry = table[dataset]
    if isinstance(entry, dict):
        if str(split) not in entry:
            raise _invalid(f"split for {where}/{dataset}", split, list(entry))
        return entry[str(split)]
    return entry[_arpl_index(split, f"{where}/{dataset}")]


def _cssr_split(dataset: str, split: str | int) -> OpenSetSplit:
    known = _pick(_splits_table()["cssr"]["splits"], dataset, split, "cssr")
    return OpenSetSplit(dataset, tuple(known), name=f"cssr/{dataset}/{split}")


def _arpl_split(dataset: str, split: str | int) -> OpenSetSplit:
    table = _splits_table()["arpl"]["splits"]
    plus = {"cifar_plus10": "cifar_plus_10_unknown_cifar100", "cifar_plus50": "cifar_plus_50_unknown_cifar100"}
    if dataset in plus:
        i = _arpl_index(split, f"arpl/{dataset}")
        return OpenSetSplit(
            "cifar10",
            tuple(table["cifar_plus_known"][i]),
            unknown=tuple(table[plus[dataset]][i]),
            unknown_dataset="cifar100",
            name=f"arpl/{dataset}/{i}",
        )
    valid = {k: v for k, v in table.items() if not k.startswith("cifar_plus")}
    if dataset not in valid:
        raise _invalid("dataset for split family 'arpl'", dataset, [*valid, *plus])
    known = _pick(valid, dataset, split, "arpl")
    return OpenSetSplit(dataset, tuple(known), name=f"arpl/{dataset}/{split}")


def _builtin_split(dataset: str, split: str | int) -> OpenSetSplit:
    """Five 6-known / 4-unknown splits per built-in data set, so tables can average over splits
    as the literature does. Fashion-MNIST: splits.json's `builtin` table; MNIST: the ARPL splits."""
    valid_datasets = ["fashion_mnist", "mnist"]
    if dataset not in valid_datasets:
        raise _invalid("dataset for split family 'builtin' (use cssr/arpl/none for others)", dataset, valid_datasets)
    index = "0" if str(split) == "default" else str(split)
    if index not in BUILTIN_SPLITS:
        raise _invalid(f"split for builtin/{dataset}", split, ["default", *BUILTIN_SPLITS])
    name = f"builtin/{dataset}/{split}"
    if dataset == "mnist":
        return OpenSetSplit("mnist", tuple(_splits_table()["arpl"]["splits"]["mnist"][int(index)]), name=name)
    known = tuple(_splits_table()["builtin"]["splits"]["fashion_mnist"][int(index)])
    unknown = tuple(c for c in range(NUM_CLASSES["fashion_mnist"]) if c not in known)
    return OpenSetSplit("fashion_mnist", known, unknown=unknown, name=name)


def all_known_split(dataset: str, num_classes: int | None = None) -> OpenSetSplit:
    """Every class known (ImageNet fine-tuning): unknowns come only from OOD sets."""
    n = num_classes if num_classes is not None else NUM_CLASSES.get(dataset)
    if n is None:
        raise DataError(
            f"split family 'none' needs the class count of '{dataset}'; build the source first "
            f"(the loaders do) or use one of {', '.join(NUM_CLASSES)}"
        )
    return OpenSetSplit(dataset, tuple(range(n)), unknown=(), name=f"none/{dataset}")


def split_by_name(family: str, dataset: str, split: str | int, num_classes: int | None = None) -> OpenSetSplit:
    """A published split: family 'cssr' (a-e), 'arpl' (0-4, incl. cifar_plus10/50), 'builtin' (0-4, default = 0), 'none'."""
    if family == "cssr":
        return _cssr_split(dataset, split)
    if family == "arpl":
        return _arpl_split(dataset, split)
    if family == "builtin":
        return _builtin_split(dataset, split)
    if family == "none":
        return all_known_split(dataset, num_classes)
    raise _invalid("split family", family, list(FAMILIES))


def valid_split_names(family: str, dataset: str) -> list[str]:
    """Split names accepted by `split_by_name` for a family and data set (for help texts)."""
    if family == "cssr":
        return list(_splits_table()["cssr"]["splits"].get(dataset, {}))
    if family == "arpl":
        return [str(i) for i in range(5)]
    if family == "builtin":
        return ["default", *BUILTIN_SPLITS]
    return []


# ---------------------------------------------------------------- reference-format split files
def _ref_dataset(entry: dict, path: Path) -> str:
    name = entry.get("dataset")
    if name not in REFERENCE_DATASETS:
        raise DataError(f"split file {path}: unknown dataset {name!r}; valid: {', '.join(REFERENCE_DATASETS)}")
    return name


def _known_from_convert(convert: list[int], keep: set[int], path: Path) -> tuple[int, ...]:
    new_labels = sorted({c for c in convert if c >= 0 and c in keep})
    if new_labels != list(range(len(new_labels))):
        raise DataError(f"split file {path}: kept labels {new_labels} are not 0..K-1")
    known = []
    for new in new_labels:
        originals = [i for i, c in enumerate(convert) if c == new]
        if len(originals) != 1:
            raise DataError(f"split file {path}: label {new} merges original classes {originals}; one class per label only")
        known.append(originals[0])
    return tuple(known)


def _parse_reference(data: dict, path: Path) -> OpenSetSplit:
    train = data["train"]
    if len(train) != 1:
        raise DataError(f"split file {path}: needs exactly one 'train' entry, found {len(train)}")
    dataset = _ref_dataset(train[0], path)
    convert = [int(c) for c in train[0]["convert_class"]]
    known = _known_from_convert(convert, {int(k) for k in train[0]["keep_class"]}, path)
    unknown: tuple[int, ...] | None = ()
    unknown_dataset, ood = None, []
    for entry in data.get("test", []):
        name = _ref_dataset(entry, path)
        keep = {int(k) for k in entry["keep_class"]}
        conv = [int(c) for c in entry["convert_class"]]
        if name == dataset:
            if conv != convert:
                raise DataError(f"split file {path}: test convert_class of '{name}' differs from train")
            unknown = None if -1 in keep else ()
        elif keep != {-1}:
            raise DataError(f"split file {path}: test set '{name}' keeps known labels; only the train data set may")
        elif is_ood_name(name):
            ood.append(name)
        elif unknown_dataset is not None:
            raise DataError(f"split file {path}: two unknown data sets ({unknown_dataset}, {name}); at most one")
        else:
            unknown_dataset = name
            unk = tuple(i for i, c in enumerate(conv) if c == -1)
            unknown = None if len(unk) == len(conv) else unk
    if unknown_dataset is not None and any(e.get("dataset") == dataset and -1 in e["keep_class"] for e in data.get("test", [])):
        raise DataError(f"split file {path}: unknowns from both '{dataset}' and '{unknown_dataset}' are not supported")
    return OpenSetSplit(dataset, known, unknown, unknown_dataset, tuple(ood), name=f"file/{path.stem}")


def split_from_reference_file(path: str | Path) -> OpenSetSplit:
    """Read a CSSR reference split file: `train`/`test` lists of {dataset, convert_class, keep_class}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}; pass an existing spl_<s>.json via data.split_file")
    try:
        data = json.loads(path.read_text())
        return _parse_reference(data, path)
    except json.JSONDecodeError as err:
        raise DataError(f"split file {path} is not valid JSON (line {err.lineno}): {err.msg}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(f"split file {path} is malformed ({type(err).__name__}: {err}); expected train/test lists of "
                        "{dataset, convert_class, keep_class}") from None


# ---------------------------------------------------------------- from the config
def check_split_names_dataset(split: OpenSetSplit, data_cfg: Any) -> OpenSetSplit:
    """A split file that names another data set than `data.dataset` is refused: the run would
    read one and record the other (summary, W&B, results tables)."""
    plus = data_cfg.dataset in ("cifar_plus10", "cifar_plus50")  # CIFAR+N: knowns of cifar10, unknowns of cifar100
    plus_pair = plus and (split.dataset, split.unknown_dataset) == ("cifar10", "cifar100")
    if split.dataset != data_cfg.dataset and not plus_pair:
        raise DataError(f"split file {data_cfg.split_file} is a split of '{split.dataset}', but data.dataset is "
                        f"'{data_cfg.dataset}'; set data.dataset={split.dataset} (with its config, "
                        f"configs/{split.dataset}/<method>.yaml) or pass a split file of '{data_cfg.dataset}'")
    return split


def resolve_split(data_cfg: Any, num_classes: int | None = None) -> OpenSetSplit:
    """The run's split: data.split_file > explicit data.known/unknown > data.split_family/data.split."""
    if data_cfg.split_file:
        return check_split_names_dataset(split_from_reference_file(data_cfg.split_file), data_cfg)
    if data_cfg.known:
        unknown = tuple(data_cfg.unknown) if data_cfg.unknown is not None else None
        return OpenSetSplit(data_cfg.dataset, tuple(data_cfg.known), unknown, data_cfg.unknown_dataset, name=f"custom/{data_cfg.dataset}")
    if data_cfg.unknown:
        raise DataError("data.unknown is set but data.known is empty; list the known classes too")
    return split_by_name(data_cfg.split_family, data_cfg.dataset, data_cfg.split, num_classes)
