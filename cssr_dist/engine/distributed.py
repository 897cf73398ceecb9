"""Evaluation across ranks: exact sharding (no padding), gathering by sample id.

Accelerate's prepared loaders pad the last batch with repeated samples so every rank
steps together; that is right for training but would count some samples twice in score
statistics. Evaluation therefore shards datasets itself (rank r takes samples r, r+W, ...)
and gathers per-sample outputs with their ids, de-duplicating by id before any metric.

Training augmentation is made independent of ranks, workers and resume points by
`SeededSamples`: each sample draws its random transforms from a seed of its own.
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
from accelerate.utils import InitProcessGroupKwargs, gather_object
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import ConfigError


DIST_TIMEOUT_ENV = "CSSR_DIST_TIMEOUT_S"


def process_group_kwargs() -> list:
    """`Accelerator(kwargs_handlers=...)`: how long a collective waits for a missing rank.

    torch waits 30 min (gloo; NCCL 10 min) before a rank blocked in a collective gives up,
    so one hung rank idles a whole allocation that long. CSSR_DIST_TIMEOUT_S (seconds)
    shortens it; unset: torch's default. It bounds every wait between ranks, including
    rank 0's solo work behind a barrier (data preparation, writing checkpoints).
    """
    value = os.environ.get(DIST_TIMEOUT_ENV, "").strip()
    if not value:
        return []
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"{DIST_TIMEOUT_ENV}={value!r} is not a positive number of seconds")
    return [InitProcessGroupKwargs(timeout=timedelta(seconds=seconds))]


class SeededSamples(Dataset):
    """Sample i of epoch e is transformed under RNG seed hash(seed, e, i); the global RNG is untouched.

    WHY: transforms draw from torch's global RNG, so without this the crop of
    an image depends on everything fetched before it: DataLoader prefetching, the number of
    workers and ranks, and where a resumed run re-created its iterator. With a seed per
    sample, a run killed and resumed mid-epoch, and 2 ranks x batch b against 1 rank x 2b,
    see the same augmented images. The epoch lives in shared memory so persistent
    DataLoader workers see `set_epoch`.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # The CPU generator only: torch.manual_seed would also seed every accelerator
        # (~200 us per call); every transform here draws from torch's CPU RNG.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(hash((self.seed, int(self._epoch), int(index))) & 0x7FFF_FFFF_FFFF_FFFF)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


def eval_module(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The bare module for evaluation, with rank 0's buffers on every rank.

    DDP's forward broadcasts buffers (a collective) on every call, so evaluating through
    the wrapper deadlocks as soon as ranks hold different numbers of evaluation batches
    (exact sharding, shard sets). The buffers (BatchNorm statistics, which each rank updated
    with its own last batch) are broadcast once here instead: every rank scores one model.
    """
    module = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
    return module


def set_epoch(loader, epoch: int) -> None:
    """Position a training loader at `epoch`: its sampler's shuffle and its per-sample seeds."""
    for obj in (loader, getattr(loader, "dataset", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def shard_dataset(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Disjoint, complete cover of `dataset` by `world_size` strided shards."""
    if world_size == 1:
        return dataset
    return Subset(dataset, list(range(rank, len(dataset), world_size)))


#: A DataLoader worker that stops delivering (e.g. its feeder thread died) would otherwise
#: be waited for without end; no healthy batch takes this long.
WORKER_TIMEOUT_S = 600


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int, world_size: int) -> DataLoader:
    """A non-shuffled loader over this rank's shard of an evaluation set."""
    return DataLoader(
        shard_dataset(dataset, rank, world_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        drop_last=False,
        persistent_workers=False,
        timeout=WORKER_TIMEOUT_S if num_workers > 0 else 0,
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
