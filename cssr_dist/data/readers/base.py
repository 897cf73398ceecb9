"""What every reader hands the engine: `RunData` (this rank's share of every set) and its meta.

Both readers (`native.py`: files on disk, `shards.py`: WebDataset shards) import these
types from here and never each other. The run's split is resolved here, once, for both:
the reader only says how many classes its training data has (`split_family: none`).
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from ...errors import DataError
from ..splits import NUM_CLASSES, OpenSetSplit, resolve_split

#: A DataLoader worker that stops delivering (e.g. its feeder thread died, a hung `pipe:` command,
#: a stalled mount) would otherwise be waited for without end; no healthy batch takes this long.
WORKER_TIMEOUT_S = 600

#: How DataLoader workers start: forked from a fork server (one single-threaded process per rank,
#: started at its first loader), never forked from the rank itself. Why: a rank has threads, and
#: a C thread that enters Python (in a rank, likely torch's or gloo's releasing a tensor) holds the
#: interpreter's thread-list lock for a moment without the GIL; a child forked in that moment
#: waits for ever in CPython 3.11's `PyOS_AfterFork_Child`. Seen here: 1 of 35 two-rank runs of
#: the shard fine-tuning test hung so, in a freshly forked evaluation worker (docs/reliability.md,
#: "Hangs"). Python 3.14 makes the fork server its default on Linux.
WORKER_START_METHOD = "forkserver"
#: Imported once by the fork server, so a loader's workers start in ~0.2 s (measured with 2), not
#: each with its own `import torch`; `__main__` stays, as multiprocessing's default preloads it.
WORKER_PRELOAD = ["__main__", "cssr_dist.data.readers.native", "cssr_dist.data.readers.shards"]


def worker_processes(num_workers: int) -> dict[str, Any]:
    """The DataLoader arguments that say how its worker processes start and how long a batch
    may take (`WORKER_START_METHOD`, `WORKER_TIMEOUT_S`); none with `num_workers=0`."""
    if num_workers <= 0:
        return {}
    context = multiprocessing.get_context(WORKER_START_METHOD)
    context.set_forkserver_preload(WORKER_PRELOAD)  # no effect once this rank's server runs
    return {"multiprocessing_context": context, "timeout": WORKER_TIMEOUT_S}


class TrainBatches(Protocol):
    """What the Trainer needs of a training iterable (both readers provide it)."""

    def __len__(self) -> int: ...  # batches per epoch on this rank

    def set_epoch(self, epoch: int) -> None: ...

    def iter_from(self, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...


@dataclass
class DataMeta:
    """What evaluation and reports need to know about the sets, beyond their batches."""

    split: OpenSetSplit
    num_classes: int
    class_names: list[str]
    #: ids of test samples -> their original labels (per-unknown-class reports); None if unknown
    test_original_of: Callable[[np.ndarray], np.ndarray] | None = None
    original_class_names: list[str] = field(default_factory=list)
    ood_groups: dict[str, str] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunData:
    """This rank's share of every set of a run: train, val, train_eval, test, ood, meta."""

    train: TrainBatches
    val: Any | None
    train_eval: Any
    test: Any
    ood: dict[str, Any]
    meta: DataMeta
    device: Any = "cpu"  # where collectives over data counts run (the accelerator's device)
    #: the train_eval images under the TRAINING augmentation (augmented_statistics only):
    #: the reference protocol's z-normalisation moments
    train_eval_augmented: Any | None = None

    def _counted_sets(self) -> dict[str, Any]:
        """The evaluation sets that count corrupt samples (shards), by report name."""
        sets = {"val": self.val, "train_eval": self.train_eval, "train_eval_augmented": self.train_eval_augmented,
                "test": self.test, **{f"ood/{name}": loader for name, loader in self.ood.items()}}
        return {name: loader for name, loader in sets.items() if hasattr(loader, "corrupt_counts")}

    def corrupt_counts(self) -> dict[str, tuple[int, int]]:
        """This rank's (seen, corrupt) per counted set so far (no collective): a baseline for
        `corrupt_samples(since=...)`."""
        return {name: loader.corrupt_counts() for name, loader in self._counted_sets().items()}

    def corrupt_samples(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor],
                        since: dict[str, tuple[int, int]] | None = None) -> dict[str, dict[str, int]]:
        """{set: {"seen", "skipped"}} of the evaluation sets that skip corrupt samples (shards),
        summed over ranks by `reduce_sum` (a collective: every rank calls it). With `since` (this
        rank's `corrupt_counts()` taken before an evaluation) only the reads after it count, and
        the sets not read since are left out: the counts of one evaluation, each set once."""
        named = self._counted_sets()
        if not named:
            return {}
        base = since or {}
        local = [[now - before for now, before in zip(loader.corrupt_counts(), base.get(name, (0, 0)))]
                 for name, loader in named.items()]
        counts = reduce_sum(torch.tensor(local, dtype=torch.float64).to(self.device)).cpu()
        report = {name: {"seen": int(c[0]), "skipped": int(c[1])} for name, c in zip(named, counts.tolist())}
        return {name: c for name, c in report.items() if since is None or c["seen"] > 0}

    def close(self) -> None:
        """Stop loader workers (shard streams keep a shard open between epochs)."""
        for loader in (self.train, self.val, self.train_eval, self.train_eval_augmented, self.test,
                       *self.ood.values()):
            if hasattr(loader, "close"):
                loader.close()


def needs_class_count(data_cfg: Any) -> bool:
    """Only `split_family: none` on a data set without a known class count asks the reader."""
    return (not data_cfg.split_file and not data_cfg.known and data_cfg.split_family == "none"
            and data_cfg.dataset not in NUM_CLASSES)


def resolve_run_split(data_cfg: Any, count_classes: Callable[[], int]) -> OpenSetSplit:
    """The run's split; `count_classes` is only called for `split_family: none` folders."""
    return resolve_split(data_cfg, num_classes=count_classes() if needs_class_count(data_cfg) else None)


def check_rank(rank: int, world: int) -> None:
    if not 0 <= rank < world:
        raise DataError(f"rank {rank} is not in 0..{world - 1} (world size {world}); check RANK / WORLD_SIZE")
