"""The native reader: files on disk (data/sources.py) -> this rank's `RunData`.

The open-set selection (known subset, validation slice, statistics subset, test subset,
OOD sets, their seeds) comes from `open_set.py`, as for the shard reader (`shards.py`),
its sibling behind the same interface (`count_classes`, `read`).

* Training: a seeded shuffle (Accelerate's `SeedableRandomSampler`) in full batches, the
  global order cut into per-rank batches by Accelerate's `BatchSamplerShard` - the order
  `accelerator.prepare` gave before, so results do not depend on who shards. Every sample
  draws its augmentation from a seed of its own (`SeededSamples`).
* Evaluation: rank r takes samples r, r+W, ... (no padding: nothing is counted twice);
  batches carry sample ids, and evaluation joins ranks by id.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
from accelerate.data_loader import BatchSamplerShard, SeedableRandomSampler, SkipBatchSampler
from torch.utils.data import BatchSampler, DataLoader, Dataset, Subset

from ...distributed import ignore_stop_signals
from ...errors import DataError
from ..open_set import (
    OpenSetConcat,
    OpenSetDataset,
    num_original_classes,
    ood_entries,
    select_ood,
    select_test,
    select_training,
)
from ..sources import build_source
from ..splits import OpenSetSplit
from .base import DataMeta, RunData, needs_class_count, resolve_run_split, worker_processes


# ---------------------------------------------------------------- the native reader
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


class KeepLastBatchSampler(BatchSampler):
    """Every sample once per epoch, the last batch partial (as the reference trains), except
    that a last batch of ONE sample joins the batch before it: BatchNorm in training mode
    has no variance to normalise one image with where a feature map is 1 x 1."""

    def __init__(self, sampler, batch_size: int):
        super().__init__(sampler, batch_size, drop_last=False)

    def __iter__(self) -> Iterator[list[int]]:
        pending = None
        for batch in super().__iter__():
            if pending is not None and len(batch) == 1:
                batch, pending = pending + batch, None
            if pending is not None:
                yield pending
            pending = batch
        if pending is not None:
            yield pending

    def __len__(self) -> int:
        full, tail = divmod(len(self.sampler), self.batch_size)
        return full + int(tail > 1 or (tail == 1 and full == 0))


class NativeTrainLoader:
    """Seeded shuffled batches of this rank; resumable at a batch without loading the skipped ones.

    `drop_last` (data.drop_last): full batches only (BatchNorm never sees a tiny batch), or
    every image every epoch (the reference protocol). With several processes the last global
    batch is then topped up from the start of the epoch's order (Accelerate's even_batches),
    so every rank takes the same number of equal batches.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int, world: int, num_workers: int,
                 drop_last: bool = True):
        if len(dataset) < batch_size * world:
            raise DataError(f"training set has {len(dataset)} samples, fewer than one global batch "
                            f"({batch_size} x {world} processes); lower data.batch_size or enlarge data.train_per_class")
        self.samples = SeededSamples(dataset, seed)
        self.sampler = SeedableRandomSampler(self.samples, data_seed=int(seed))
        if world == 1 and not drop_last:
            self.batch_sampler = KeepLastBatchSampler(self.sampler, batch_size)
        else:
            batches = BatchSampler(self.sampler, batch_size, drop_last=drop_last)
            self.batch_sampler = batches if world == 1 else BatchSamplerShard(batches, world, rank, even_batches=True)
        self.num_workers = num_workers
        self._loader = self._data_loader(self.batch_sampler)

    def _data_loader(self, batch_sampler) -> DataLoader:
        workers = self.num_workers
        return DataLoader(self.samples, batch_sampler=batch_sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                          worker_init_fn=ignore_stop_signals, **worker_processes(workers))

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.samples.set_epoch(epoch)

    def iter_from(self, skip: int) -> Iterator:
        """This epoch's batches from batch `skip` on (a resumed run continues mid-epoch)."""
        if not skip:
            return iter(self._loader)
        return iter(self._data_loader(SkipBatchSampler(self.batch_sampler, skip)))

    def __iter__(self) -> Iterator:
        return self.iter_from(0)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int, world: int) -> DataLoader:
    """A non-shuffled loader over this rank's strided share (rank r: samples r, r+W, ...)."""
    share = dataset if world == 1 else Subset(dataset, list(range(rank, len(dataset), world)))
    return DataLoader(share, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False,
                      persistent_workers=False, worker_init_fn=ignore_stop_signals, **worker_processes(num_workers))


def _native_test_set(data_cfg: Any, split: OpenSetSplit, transform: Callable, seed: int) -> tuple[Dataset, list[str]]:
    source = build_source(split.dataset, data_cfg.root, train=False, download=data_cfg.download)
    pick = select_test(np.asarray(source.targets), split, data_cfg, seed, num_original_classes(source))
    primary = OpenSetDataset(source, split, indices=pick, transform=transform, role="test")
    if split.unknown_dataset is None:
        return primary, list(source.classes)
    other = build_source(split.unknown_dataset, data_cfg.root, train=False, download=data_cfg.download)
    pick = select_test(np.asarray(other.targets), split, data_cfg, seed, num_original_classes(other), role="unknown")
    unknown = OpenSetDataset(other, split, indices=pick, transform=transform, role="unknown", id_offset=len(source))
    return OpenSetConcat([primary, unknown]), list(other.classes)


def training_classes(data_cfg: Any, dataset: str) -> list[str]:
    """Original class names of training set `dataset` (its class folders, or the built-in names)."""
    return list(build_source(dataset, data_cfg.root, train=True, download=data_cfg.download).classes)


def read(data_cfg: Any, seed: int, rank: int, world: int, *, train_tf: Callable, test_tf: Callable,
         stats_tf: Callable | None, augmented_statistics: bool = False, device: Any = "cpu") -> RunData:
    """This rank's share of every set from files on disk (`augmented_statistics`, `device`: shards only)."""
    def training_source(name: str):
        return build_source(name, data_cfg.root, train=True, download=data_cfg.download)

    if needs_class_count(data_cfg):  # the source is read once, for its class count and its samples
        source = training_source(data_cfg.dataset)
        split = resolve_run_split(data_cfg, lambda: len(source.classes))
    else:
        split = resolve_run_split(data_cfg, lambda: 0)
        source = training_source(split.dataset)
    labels = np.asarray(source.targets)
    chosen = select_training(labels, split, data_cfg, seed, num_original_classes(source))
    view = lambda idx, tf, role: OpenSetDataset(source, split, indices=idx, transform=tf, role=role)  # noqa: E731
    train = view(chosen.train, train_tf, "train")
    test, original_names = _native_test_set(data_cfg, split, test_tf, seed)
    ood, groups = {}, {}
    for entry in ood_entries(data_cfg, split):
        ood_source = build_source(entry.source, entry.root, train=False, download=False)
        pick = select_ood(np.asarray(ood_source.targets), data_cfg, seed)
        ood[entry.name] = OpenSetDataset(ood_source, split, indices=pick, transform=test_tf, role="ood")
        groups[entry.name] = entry.group

    workers, eval_bs = data_cfg.num_workers, data_cfg.eval_batch_size
    evaluate = lambda ds: eval_loader(ds, eval_bs, workers, rank, world)  # noqa: E731
    counts = {"source": getattr(source, "origin", str(data_cfg.root)),
              "train": len(train), "val": len(chosen.val), "train_eval": len(chosen.train_eval),
              "test_known": int((test.labels >= 0).sum()), "test_unknown": int((test.labels < 0).sum()),
              "ood": {name: len(ds) for name, ds in ood.items()}}
    return RunData(
        train=NativeTrainLoader(train, data_cfg.batch_size, seed, rank, world, workers, data_cfg.drop_last),
        val=evaluate(view(chosen.val, test_tf, "val")) if len(chosen.val) else None,
        train_eval=evaluate(view(chosen.train_eval, test_tf, "train_eval")),
        train_eval_augmented=None if stats_tf is None else evaluate(view(chosen.train_eval, stats_tf, "train_eval")),
        test=evaluate(test),
        ood={name: evaluate(ds) for name, ds in ood.items()},
        meta=DataMeta(split=split, num_classes=split.num_known, class_names=train.known_class_names,
                      test_original_of=test.original_labels_of, original_class_names=original_names,
                      ood_groups=groups, counts=counts),
    )
