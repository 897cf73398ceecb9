"""Data: open-set splits, raw sources, transforms, open-set views and loaders.

Import the submodules directly (`from cssr_dist.data.loaders import build_datasets`);
this package namespace re-exports the main entry points for convenience.
"""

from .loaders import DataBundle, Loaders, build_data, build_datasets, build_loaders
from .open_set import OpenSetConcat, OpenSetDataset, per_class_subset, train_val_split
from .sources import build_source
from .splits import OpenSetSplit, resolve_split, split_by_name, split_from_reference_file
from .transforms import build_transform

__all__ = [
    "DataBundle",
    "Loaders",
    "OpenSetConcat",
    "OpenSetDataset",
    "OpenSetSplit",
    "build_data",
    "build_datasets",
    "build_loaders",
    "build_source",
    "build_transform",
    "per_class_subset",
    "resolve_split",
    "split_by_name",
    "split_from_reference_file",
    "train_val_split",
]
