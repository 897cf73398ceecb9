"""Source + split + subset + transform -> (image tensor, open-set label, sample id).

The id is the sample's index into its source (plus an offset when two sources form one
evaluation set), so evaluation can gather per-sample outputs across ranks and
de-duplicate them. Roles decide which samples are kept and how they are labelled:

* train / val / train_eval: known classes only, labels 0..K-1;
* test: the primary data set's known classes + its unknown classes (label -1);
* unknown: a second data set's test images of `split.unknown` classes, all -1 (CIFAR+N);
* ood: every image, all -1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError, check_plain_name
from .splits import OpenSetSplit

ROLES = ("train", "val", "train_eval", "test", "unknown", "ood")
TRAINING_ROLES = ("train", "val", "train_eval")


def lookup_by_id(all_ids: np.ndarray, values: np.ndarray, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """values[k] for each id, where all_ids[k] == id (ids gathered from ranks come in any order)."""
    order = np.argsort(all_ids, kind="stable")
    ids = np.asarray(ids, dtype=np.int64)
    pos = np.searchsorted(all_ids[order], ids)
    pos = np.clip(pos, 0, max(len(order) - 1, 0))
    if len(order) == 0 or not np.array_equal(all_ids[order][pos], ids):
        raise DataError("some sample ids do not belong to this evaluation set; mixed up loaders?")
    return values[order[pos]]


def num_original_classes(source: Any) -> int:
    """Class count of a source: its class names, or the largest label + 1 when names are missing."""
    targets = np.asarray(source.targets)
    top = int(targets.max()) + 1 if targets.size else 0
    return max(len(getattr(source, "classes", [])), top)


def role_keep_and_labels(targets: np.ndarray, split: OpenSetSplit, role: str, num_original: int) -> tuple[np.ndarray, np.ndarray]:
    """(boolean keep mask, open-set labels) over all samples of a source for a role."""
    targets = np.asarray(targets, dtype=np.int64)
    if role == "ood":
        return np.ones(len(targets), dtype=bool), np.full(len(targets), -1, dtype=np.int64)
    if role == "unknown":
        keep = np.ones(len(targets), dtype=bool) if split.unknown is None else np.isin(targets, split.unknown)
        return keep, np.full(len(targets), -1, dtype=np.int64)
    if targets.size and targets.min() < 0:
        raise DataError(f"role '{role}' needs labelled images, but the source has unlabelled (-1) samples; use it as an OOD set")
    table = split.label_map(num_original)
    labels = table[targets]
    if role in TRAINING_ROLES:
        return labels >= 0, labels
    if role == "test":
        return np.isin(targets, split.primary_test_classes(num_original)), labels
    raise DataError(f"unknown open-set role {role!r}; valid: {', '.join(ROLES)}")


class OpenSetDataset(Dataset):
    """A view of `source` for one role of an open-set split; yields (tensor, label, id)."""

    def __init__(self, source: Dataset, split: OpenSetSplit, *, indices: Sequence[int] | np.ndarray | None = None,
                 transform: Callable | None = None, role: str = "train", id_offset: int = 0) -> None:
        if role not in ROLES:
            raise DataError(f"unknown open-set role {role!r}; valid: {', '.join(ROLES)}")
        self.source, self.split, self.transform, self.role = source, split, transform, role
        targets = np.asarray(source.targets, dtype=np.int64)
        keep, labels = role_keep_and_labels(targets, split, role, num_original_classes(source))
        candidates = np.arange(len(targets)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.indices = candidates[keep[candidates]]
        self.labels = labels[self.indices]
        self.original_labels = targets[self.indices]
        self.ids = self.indices + int(id_offset)
        classes = list(getattr(source, "classes", []))
        self.known_class_names = [classes[k] if k < len(classes) else str(k) for k in split.known] if role != "unknown" else []
        unknown_orig = sorted(set(self.original_labels[self.labels < 0].tolist()))
        self.unknown_class_names = [classes[u] if 0 <= u < len(classes) else "unknown" for u in unknown_orig]

    @property
    def num_classes(self) -> int:
        return self.split.num_known

    def original_labels_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Original labels of samples given by id (what evaluation gathers), not by position."""
        return lookup_by_id(self.ids, self.original_labels, ids)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        img, _ = self.source[int(self.indices[i])]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i]), int(self.ids[i])


class OpenSetConcat(Dataset):
    """Several `OpenSetDataset`s as one evaluation set (CIFAR+N: CIFAR-10 known + CIFAR-100 unknown)."""

    def __init__(self, parts: Sequence[OpenSetDataset]) -> None:
        self.parts = list(parts)
        ids = np.concatenate([p.ids for p in self.parts])
        if len(np.unique(ids)) != len(ids):
            raise DataError("sample ids of the parts of one evaluation set overlap; give each part an id_offset")
        self.labels = np.concatenate([p.labels for p in self.parts])
        self.original_labels = np.concatenate([p.original_labels for p in self.parts])
        self.ids = ids
        self.known_class_names = self.parts[0].known_class_names
        self.unknown_class_names = [n for p in self.parts for n in p.unknown_class_names]
        self._ends = np.cumsum([len(p) for p in self.parts])

    @property
    def num_classes(self) -> int:
        return self.parts[0].num_classes

    def original_labels_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return lookup_by_id(self.ids, self.original_labels, ids)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        part = int(np.searchsorted(self._ends, i, side="right"))
        start = int(self._ends[part - 1]) if part else 0
        return self.parts[part][i - start]


# ---------------------------------------------------------------- seeded stratified subsets
def per_class_subset(targets: Sequence[int] | np.ndarray, n_per_class: int | None, seed: int,
                     indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """At most `n_per_class` random samples of every class (among `indices` if given), sorted."""
    targets = np.asarray(targets, dtype=np.int64)
    pool = np.arange(len(targets)) if indices is None else np.asarray(indices, dtype=np.int64)
    if n_per_class is None:
        return np.sort(pool)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(targets[pool]):
        members = pool[targets[pool] == cls]
        chosen.append(rng.permutation(members)[:n_per_class])
    return np.sort(np.concatenate(chosen)) if chosen else pool[:0]


def train_val_split(known_indices: Sequence[int] | np.ndarray, targets: Sequence[int] | np.ndarray,
                    val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) split of known training samples; val picks thresholds and the best checkpoint.

    Every class with at least 2 samples gives round(n * val_fraction) samples (at least 1,
    at most n - 1) to validation, so no class vanishes from either side.
    """
    targets = np.asarray(targets, dtype=np.int64)
    pool = np.asarray(known_indices, dtype=np.int64)
    if val_fraction <= 0:
        return np.sort(pool), pool[:0]
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(targets[pool]):
        members = rng.permutation(pool[targets[pool] == cls])
        n_val = min(max(int(round(len(members) * val_fraction)), 1), len(members) - 1) if len(members) > 1 else 0
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# ---------------------------------------------------------------- the open-set selection of a run
#: Offsets added to the run seed so each random choice is independent but reproducible.
SEED_TRAIN_SUBSET, SEED_VAL, SEED_STATS, SEED_TEST = 101, 202, 303, 404


@dataclass(frozen=True)
class TrainingSelection:
    """Indices into the training source: what trains, what validates, what fits score statistics."""

    train: np.ndarray
    val: np.ndarray
    train_eval: np.ndarray


def select_training(labels: np.ndarray, split: OpenSetSplit, data_cfg: Any, seed: int, num_original: int,
                    val_split: Callable[..., tuple[np.ndarray, np.ndarray]] = train_val_split) -> TrainingSelection:
    """The known-class subset, the validation slice and the statistics subset, for either format.

    `val_split(known, labels, fraction, seed)` lets a reader choose HOW validation is cut
    (the shard reader takes whole shards when it can); WHICH samples are candidates is
    decided here only.
    """
    keep, _ = role_keep_and_labels(labels, split, "train", num_original)
    known = per_class_subset(labels, data_cfg.train_per_class, seed + SEED_TRAIN_SUBSET, indices=np.flatnonzero(keep))
    train, val = val_split(known, labels, data_cfg.val_fraction, seed + SEED_VAL)
    if len(train) == 0:
        raise DataError(f"no training images of the known classes {list(split.known)} in '{split.dataset}'; "
                        "check data.root, data.dataset and the split")
    stats = per_class_subset(labels, data_cfg.stats_per_class, seed + SEED_STATS, indices=train)
    return TrainingSelection(train=train, val=val, train_eval=stats)


def select_test(labels: np.ndarray, split: OpenSetSplit, data_cfg: Any, seed: int, num_original: int,
                role: str = "test") -> np.ndarray:
    """Test samples of `role` (the primary set's known + unknown classes, or a second set's
    unknowns), at most data.test_per_class per original class."""
    keep, _ = role_keep_and_labels(labels, split, role, num_original)
    return per_class_subset(labels, data_cfg.test_per_class, seed + SEED_TEST, indices=np.flatnonzero(keep))


def select_ood(labels: np.ndarray, data_cfg: Any, seed: int) -> np.ndarray:
    """An OOD set's samples; every label is unknown, so test_per_class caps the set's total."""
    return per_class_subset(np.asarray(labels), data_cfg.test_per_class, seed + SEED_TEST)


@dataclass(frozen=True)
class OodEntry:
    """One OOD evaluation set of a run: where it comes from and how it is grouped in reports."""

    name: str
    source: str
    root: str
    shards: str | None
    group: str


def ood_entries(data_cfg: Any, split: OpenSetSplit) -> list[OodEntry]:
    """data.ood entries, then the split's own OOD sets by name; names must be distinct."""
    entries = []
    for entry in data_cfg.ood:
        name = entry.name or entry.source
        entries.append(OodEntry(name, entry.source, entry.root or os.path.join(data_cfg.root, name), entry.shards,
                                getattr(entry, "group", "far")))
    named = {e.name for e in entries}
    for name in split.ood_datasets:
        check_plain_name(name, f"split '{split.name}' OOD set", DataError)  # read from <data.root>/<name>
        if name not in named:
            entries.append(OodEntry(name, name, os.path.join(data_cfg.root, name), name, "far"))
    if len({e.name for e in entries}) != len(entries):
        raise DataError(f"data.ood has duplicate names {[e.name for e in entries]}; give each entry a distinct name")
    return entries
