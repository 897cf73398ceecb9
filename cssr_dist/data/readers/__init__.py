"""Readers: a data config -> `RunData`, this rank's share of every set, for each `data.format`.

Two siblings behind one interface, chosen by `data.format` here and nowhere else:

* `native.py`: files on disk in their own layouts (data/sources.py, data/layouts.py);
* `shards.py`: WebDataset shards made by `cssr-make-shards` (data/shards/: index, tar, samples).

Each reader module provides `training_classes(data_cfg, dataset) -> list[str]` (the training
data's original classes: their count for `split_family: none`, names for reports) and `read(data_cfg, seed, rank, world, *, train_tf,
test_tf, stats_tf, augmented_statistics, device) -> RunData`. Neither imports the other;
what they share (`RunData`, `DataMeta`, the split rule) is in `base.py`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from ...errors import ConfigError
from ..splits import OpenSetSplit
from ..transforms import build_transform
from .base import DataMeta, RunData, TrainBatches, check_rank, resolve_run_split

#: data.format -> reader module, imported when chosen (start-up time: the shard reader pulls in
#: webdataset, the native one Accelerate's samplers; a run needs only one of them).
READERS = {"native": "native", "shards": "shards"}

__all__ = ["DataMeta", "READERS", "RunData", "TrainBatches", "build_run_data", "known_class_names", "reader_for",
           "run_split"]


def reader_for(data_cfg: Any) -> ModuleType:
    """The reader module of `data.format`."""
    if data_cfg.format not in READERS:
        raise ConfigError(f"data.format={data_cfg.format!r} unknown; choose one of {', '.join(READERS)}")
    return importlib.import_module(f".{READERS[data_cfg.format]}", __name__)


def run_split(data_cfg: Any) -> OpenSetSplit:
    """The run's split without building any loader (predict.py); the readers resolve it the same way."""
    return resolve_run_split(data_cfg, lambda: len(reader_for(data_cfg).training_classes(data_cfg, data_cfg.dataset)))


def known_class_names(data_cfg: Any) -> list[str]:
    """Names of the known classes in the model's order (known class i = split.known[i])."""
    split = run_split(data_cfg)
    classes = reader_for(data_cfg).training_classes(data_cfg, split.dataset)
    return [classes[k] if k < len(classes) else str(k) for k in split.known]


def build_run_data(data_cfg: Any, seed: int, rank: int = 0, world: int = 1,
                   augmented_statistics: bool = False, device: torch.device | str = "cpu") -> RunData:
    """This rank's share of every set of the run, for data.format native or shards.

    `augmented_statistics`: the statistics images also come under the TRAINING transforms
    (`train_eval_augmented`), for the reference protocol's z-normalisation moments
    (eval.stats_transform=train); `train_eval` keeps the test transforms.
    `device`: where `data.shards.decode_on: device` decodes and augments (the loaders then
    yield batches already there).
    """
    check_rank(rank, world)
    train_tf, test_tf = build_transform(data_cfg, train=True), build_transform(data_cfg, train=False)
    data = reader_for(data_cfg).read(data_cfg, seed, rank, world, train_tf=train_tf, test_tf=test_tf,
                                     stats_tf=train_tf if augmented_statistics else None,
                                     augmented_statistics=augmented_statistics, device=device)
    data.device = device
    return data
