"""Data: open-set splits, raw sources, transforms, the open-set selection and `build_run_data`.

`build_run_data(data_cfg, seed, rank, world)` is the one entry the engine uses; it returns
this rank's share of every set for either data.format (`run_data.py`).
"""

from .open_set import OpenSetConcat, OpenSetDataset, per_class_subset, train_val_split
from .run_data import DataMeta, RunData, build_run_data
from .sources import build_source
from .splits import OpenSetSplit, resolve_split, split_by_name, split_from_reference_file
from .transforms import build_transform

__all__ = [
    "DataMeta",
    "OpenSetConcat",
    "OpenSetDataset",
    "OpenSetSplit",
    "RunData",
    "build_run_data",
    "build_source",
    "build_transform",
    "per_class_subset",
    "resolve_split",
    "split_by_name",
    "split_from_reference_file",
    "train_val_split",
]
