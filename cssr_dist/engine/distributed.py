"""Evaluation across ranks: exact sharding (no padding), gathering by sample id.

Accelerate's prepared loaders pad the last batch with repeated samples so every rank
steps together; that is right for training but would count some samples twice in score
statistics. Evaluation therefore shards datasets itself (rank r takes samples r, r+W, ...)
and gathers per-sample outputs with their ids, de-duplicating by id before any metric.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Dataset, Subset


def shard_dataset(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Disjoint, complete cover of `dataset` by `world_size` strided shards."""
    if world_size == 1:
        return dataset
    return Subset(dataset, list(range(rank, len(dataset), world_size)))


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int, world_size: int) -> DataLoader:
    """A non-shuffled loader over this rank's shard of an evaluation set."""
    return DataLoader(
        shard_dataset(dataset, rank, world_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        drop_last=False,
        persistent_workers=False,
    )


def concat_local(chunks: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Per-batch tensors -> one numpy array per key (host copy once, at the end)."""
    if not chunks:
        return {}
    return {key: torch.cat([c[key] for c in chunks]).cpu().numpy() for key in chunks[0]}


def gather_by_id(local: dict[str, np.ndarray], world_size: int) -> dict[str, np.ndarray]:
    """All ranks' per-sample arrays joined, de-duplicated by `ids`, sorted by id."""
    parts = gather_object([local]) if world_size > 1 else [local]
    parts = [p for p in parts if p]
    if not parts:
        return {}
    joined = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    _, first = np.unique(joined["ids"], return_index=True)
    return {key: value[first] for key, value in joined.items()}
