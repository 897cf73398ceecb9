"""From `DataConfig` to the data sets and plain DataLoaders of one run.

`build_datasets` assembles the open-set views (train, validation slice, training set with
test transforms for score statistics, test, OOD sets); `build_loaders` wraps them in
ordinary DataLoaders. Distribution is not done here: the engine passes the training
loader through `accelerator.prepare` and shards evaluation sets itself, so ranks never
disagree about what a data set contains. `build_data` is the one-call entry that also
covers `data.format: shards` (streamed by `cssr_dist.data.shards`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .open_set import (
    OpenSetConcat,
    OpenSetDataset,
    num_original_classes,
    per_class_subset,
    role_keep_and_labels,
    train_val_split,
)
from .sources import build_source
from .splits import NUM_CLASSES, OpenSetSplit, resolve_split
from .transforms import build_transform

# Offsets added to the run seed so each random choice is independent but reproducible.
_SEED_TRAIN_SUBSET, _SEED_VAL, _SEED_STATS, _SEED_TEST = 101, 202, 303, 404


@dataclass
class DataBundle:
    """The open-set data sets of a run (native format)."""

    split: OpenSetSplit
    num_classes: int
    class_names: list[str]
    train: OpenSetDataset
    val: OpenSetDataset | None
    train_eval: OpenSetDataset
    test: Dataset
    ood: dict[str, OpenSetDataset] = field(default_factory=dict)
    #: names of the test set's original labels of UNKNOWN samples (the unknown data set's
    #: classes for CIFAR+N), for per-unknown-class reports
    original_class_names: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Sizes for the run log: what the run actually trained and tested on."""
        test_labels = self.test.labels
        return {
            "split": self.split.name,
            "num_classes": self.num_classes,
            "train": len(self.train),
            "val": len(self.val) if self.val is not None else 0,
            "train_eval": len(self.train_eval),
            "test_known": int((test_labels >= 0).sum()),
            "test_unknown": int((test_labels < 0).sum()),
            "ood": {name: len(ds) for name, ds in self.ood.items()},
        }


@dataclass
class Loaders:
    """Plain DataLoaders (not yet prepared by Accelerate) plus what the model needs to know."""

    split: OpenSetSplit
    num_classes: int
    class_names: list[str]
    train: Any
    val: Any | None
    train_eval: Any
    test: Any
    ood: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- data sets
def _split_for(data_cfg: Any, source_classes: int | None) -> OpenSetSplit:
    return resolve_split(data_cfg, num_classes=source_classes)


def _needs_class_count(data_cfg: Any) -> bool:
    return (not data_cfg.split_file and not data_cfg.known and data_cfg.split_family == "none"
            and data_cfg.dataset not in NUM_CLASSES)


def _known_indices(source: Dataset, split: OpenSetSplit) -> np.ndarray:
    keep, _ = role_keep_and_labels(np.asarray(source.targets), split, "train", num_original_classes(source))
    return np.flatnonzero(keep)


def _ood_entries(data_cfg: Any, split: OpenSetSplit) -> list[tuple[str, str, str]]:
    """(name, source, root) of every OOD set: data.ood entries, then the split's own OOD sets."""
    entries = []
    for entry in data_cfg.ood:
        name = entry.name or entry.source
        entries.append((name, entry.source, entry.root or os.path.join(data_cfg.root, name)))
    named = {e[0] for e in entries}
    for name in split.ood_datasets:
        if name not in named:
            entries.append((name, name, os.path.join(data_cfg.root, name)))
    if len({e[0] for e in entries}) != len(entries):
        raise DataError(f"data.ood has duplicate names {[e[0] for e in entries]}; give each entry a distinct name")
    return entries


def _test_set(data_cfg: Any, split: OpenSetSplit, transform: Any, seed: int) -> tuple[Dataset, list[str]]:
    source = build_source(split.dataset, data_cfg.root, train=False, download=data_cfg.download)
    pick = per_class_subset(source.targets, data_cfg.test_per_class, seed + _SEED_TEST)
    primary = OpenSetDataset(source, split, indices=pick, transform=transform, role="test")
    if split.unknown_dataset is None:
        return primary, list(source.classes)
    other = build_source(split.unknown_dataset, data_cfg.root, train=False, download=data_cfg.download)
    pick = per_class_subset(other.targets, data_cfg.test_per_class, seed + _SEED_TEST)
    unknown = OpenSetDataset(other, split, indices=pick, transform=transform, role="unknown", id_offset=len(source))
    return OpenSetConcat([primary, unknown]), list(other.classes)


def build_datasets(data_cfg: Any, seed: int) -> DataBundle:
    """Open-set data sets of a run in the native format (files on disk)."""
    if data_cfg.format == "shards":
        raise DataError("data.format=shards streams from shard files; call cssr_dist.data.loaders.build_data instead")
    train_tf, test_tf = build_transform(data_cfg, train=True), build_transform(data_cfg, train=False)
    if _needs_class_count(data_cfg):
        source = build_source(data_cfg.dataset, data_cfg.root, train=True, download=data_cfg.download)
        split = _split_for(data_cfg, len(source.classes))
    else:
        split = _split_for(data_cfg, None)
        source = build_source(split.dataset, data_cfg.root, train=True, download=data_cfg.download)

    known = _known_indices(source, split)
    known = per_class_subset(source.targets, data_cfg.train_per_class, seed + _SEED_TRAIN_SUBSET, indices=known)
    train_idx, val_idx = train_val_split(known, source.targets, data_cfg.val_fraction, seed + _SEED_VAL)
    if len(train_idx) == 0:
        raise DataError(f"no training images of the known classes {list(split.known)} in '{split.dataset}' under {data_cfg.root}")
    stats_idx = per_class_subset(source.targets, data_cfg.stats_per_class, seed + _SEED_STATS, indices=train_idx)

    test, original_names = _test_set(data_cfg, split, test_tf, seed)
    ood = {}
    for name, kind, root in _ood_entries(data_cfg, split):
        ood_source = build_source(kind, root, train=False, download=False)
        # all OOD labels are -1, so test_per_class caps an OOD set at that many images in total
        pick = per_class_subset(ood_source.targets, data_cfg.test_per_class, seed + _SEED_TEST)
        ood[name] = OpenSetDataset(ood_source, split, indices=pick, transform=test_tf, role="ood")

    train = OpenSetDataset(source, split, indices=train_idx, transform=train_tf, role="train")
    return DataBundle(
        split=split,
        num_classes=split.num_known,
        class_names=train.known_class_names,
        train=train,
        val=OpenSetDataset(source, split, indices=val_idx, transform=test_tf, role="val") if len(val_idx) else None,
        train_eval=OpenSetDataset(source, split, indices=stats_idx, transform=test_tf, role="train_eval"),
        test=test,
        ood=ood,
        original_class_names=original_names,
    )


# ---------------------------------------------------------------- loaders
def _loader(dataset: Dataset, batch_size: int, workers: int, train: bool, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,  # BatchNorm: no tiny last batch in training
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed) if train else None,
    )


def build_loaders(bundle: DataBundle, data_cfg: Any, seed: int) -> Loaders:
    """Plain DataLoaders: training shuffled with drop_last, the rest in order."""
    if len(bundle.train) < data_cfg.batch_size:
        raise DataError(f"training set has {len(bundle.train)} samples, fewer than data.batch_size={data_cfg.batch_size}; "
                        "lower the batch size or raise data.train_per_class")
    workers, eval_bs = data_cfg.num_workers, data_cfg.eval_batch_size
    return Loaders(
        split=bundle.split,
        num_classes=bundle.num_classes,
        class_names=bundle.class_names,
        train=_loader(bundle.train, data_cfg.batch_size, workers, True, seed),
        val=_loader(bundle.val, eval_bs, workers, False, seed) if bundle.val is not None else None,
        train_eval=_loader(bundle.train_eval, eval_bs, workers, False, seed),
        test=_loader(bundle.test, eval_bs, workers, False, seed),
        ood={name: _loader(ds, eval_bs, workers, False, seed) for name, ds in bundle.ood.items()},
    )


def _shard_split(data_cfg: Any) -> OpenSetSplit:
    if not _needs_class_count(data_cfg):
        return _split_for(data_cfg, None)
    from .shards.index import read_index

    index, _ = read_index(data_cfg.shards.train or "", data_cfg.root)
    return _split_for(data_cfg, index.num_classes)


def build_data(data_cfg: Any, seed: int) -> Loaders:
    """Loaders of a run for either data.format: native files or WebDataset shards."""
    if data_cfg.format != "shards":
        return build_loaders(build_datasets(data_cfg, seed), data_cfg, seed)
    split = _shard_split(data_cfg)
    train_tf, test_tf = build_transform(data_cfg, train=True), build_transform(data_cfg, train=False)
    try:
        from .shards.stream import build_shard_loaders
    except ImportError as err:
        raise DataError(f"data.format=shards needs cssr_dist.data.shards.build_shard_loaders, which is not available ({err})") from None
    return build_shard_loaders(data_cfg, split, train_tf, test_tf, seed)
