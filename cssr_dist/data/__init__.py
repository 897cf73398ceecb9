"""Data: open-set splits, on-disk layouts and sources, transforms, the open-set selection, readers.

`build_run_data(data_cfg, seed, rank, world)` is the one entry the engine uses; it returns
this rank's share of every set for either data.format (`readers/`).
"""

import importlib
from typing import Any

# name -> submodule, imported on first use (PEP 562): a tool that needs one light submodule (the tar
# reader, the split files) does not pay for torch, torchvision and Accelerate.
_EXPORTS = {
    "DataMeta": "readers",
    "OpenSetConcat": "open_set",
    "OpenSetDataset": "open_set",
    "OpenSetSplit": "splits",
    "RunData": "readers",
    "build_run_data": "readers",
    "build_source": "sources",
    "build_transform": "transforms",
    "per_class_subset": "open_set",
    "resolve_split": "splits",
    "split_by_name": "splits",
    "split_from_reference_file": "splits",
    "train_val_split": "open_set",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
