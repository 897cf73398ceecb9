"""The shard reader: WebDataset shards -> this rank's `RunData`, streamed to every rank and worker.

The sibling of the native reader (`native.py`), behind the same interface (`count_classes`,
`read`); the open-set selection comes from `open_set.py` for both.

Why a loader of our own around webdataset's pieces (`gopen` URLs, key grouping, shuffle
buffer, batching) instead of `wds.WebDataset` + `accelerator.prepare`:

* Accelerate would read on rank 0 and dispatch (crash/hang with iterable data sets), so
  these loaders split by rank THEMSELVES and must never go through `accelerator.prepare`.
* Training: every rank yields the same number of full batches (the `with_epoch` idea:
  an endless per-worker stream cut at `index counts / world size`), else DDP hangs.
* Evaluation: shard i goes to rank `i % world`, then worker; every sample is seen exactly
  once across ranks and workers, and batches carry sample ids to de-duplicate/join by.
* Decoding is explicit (data/shards/samples.py): never unpickled, unknown members refused.
* Corrupt samples are skipped and counted; above `max_corrupt_fraction` the run stops.
* Shard files are closed (no ResourceWarning), including when an epoch stops mid-shard.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import random
import re
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ...distributed import dist_info, ignore_stop_signals
from ...errors import DataError
from ..batch_transform import BatchTail, main_process_has_a_core, split_at_to_tensor
from ..device_augment import collate_encoded, device_stage, is_jpeg
from ..heap_reuse import keep_freed_memory, worker_init
from ..open_set import ood_entries, select_ood, select_test, select_training, train_val_split
from ..shards.index import ShardIndex, local_path, read_index, read_labels, shard_urls
from ..shards.samples import CorruptSample, check_members, decode_image, image_member, iter_shard, parse_id, parse_label
from .base import DataMeta, RunData, check_rank, resolve_run_split, worker_processes

log = logging.getLogger(__name__)

# A worker stops early (instead of at the end of the epoch) once it has this many samples
# and too many were corrupt: enough to not stop on the first bad file of a tiny shard.
EARLY_CHECK_MIN_SAMPLES = 1000
MAX_LOGGED_CORRUPT = 5


# ---------------------------------------------------------------- decoding
def device_payload(sample: dict, mode: str | None) -> bytes | np.ndarray:
    """decode_on=device: JPEG bytes as stored (the device decodes them), other formats
    decoded here to uint8 pixels (data/device_augment.py)."""
    data = sample[image_member(sample)]
    return data if is_jpeg(data) else np.asarray(decode_image(sample, mode))


def collate(samples: list[tuple[torch.Tensor, int, int]],
            batch_transform: BatchTail | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's default_collate: in a worker it stacks straight into shared memory (no extra copy).
    With `batch_transform` (uint8 images) the stack is converted into a shared float batch here."""
    if batch_transform is None:
        images, labels, ids = default_collate(samples)
        return images, labels.to(torch.int64), ids.to(torch.int64)
    images = batch_transform(torch.stack([s[0] for s in samples]))
    return images, torch.tensor([s[1] for s in samples]), torch.tensor([s[2] for s in samples])


# ---------------------------------------------------------------- shard assignment
def assigned_shards(order: list[int], rank: int, world: int, worker: int, workers: int) -> list[int]:
    """Shards of one (rank, worker): split by node, then by worker (webdataset's convention)."""
    return order[rank::world][worker::workers]


def effective_workers(num_shards: int, world: int, workers: int, what: str) -> int:
    """Workers that can each own >= 1 shard; with fewer shards than ranks it cannot work at all."""
    slots = max(1, workers)
    if num_shards >= world * slots:
        return workers
    if num_shards < world:
        raise DataError(f"{what} has {num_shards} shards but {world} ranks x {slots} workers need at least "
                        f"{world * slots} (never fewer than {world}); re-run tools/make_shards.py with a smaller "
                        "--samples-per-shard, or use fewer ranks")
    reduced = num_shards // world
    warnings.warn(f"{what}: {num_shards} shards < {world} ranks x {slots} workers; using {reduced} workers per rank "
                  f"(make >= {world * slots} shards to use all)", stacklevel=2)
    return reduced


# ---------------------------------------------------------------- the streaming data set
@dataclass
class StreamPlan:
    """What one loader streams; arrays are indexed by sample id."""

    name: str
    urls: list[str]
    starts: np.ndarray  # first id of each shard (ids are consecutive within and across shards)
    keep: np.ndarray  # bool: yielded by this loader
    original: np.ndarray  # original label (-1 = OOD) from the index's labels file
    table: np.ndarray  # original label -> open-set label (0..K-1 or -1)
    image_mode: str | None

    def kept_in_shard(self, shard: int) -> int:
        end = self.starts[shard + 1] if shard + 1 < len(self.starts) else len(self.keep)
        return int(self.keep[self.starts[shard]:end].sum())


class ShardStream(IterableDataset):
    """Batches `(images, labels, ids)` of one rank; splits shards over DataLoader workers itself."""

    def __init__(self, plan: StreamPlan, transform: Callable | None, *, batch_size: int, training: bool,
                 rank: int, world_size: int, num_workers: int, seed: int, shuffle_buffer: int = 2000,
                 max_corrupt_fraction: float = 0.01, decode_on: str = "cpu") -> None:
        super().__init__()
        # per image up to uint8 (PIL work), per batch from ToTensor on: see data/batch_transform.py;
        # decode_on=device: workers only read members, a DeviceBatchStage decodes and transforms
        self.decode_on = decode_on
        self.transform, self.batch_transform = split_at_to_tensor(transform) if decode_on == "cpu" else (None, None)
        self.plan, self.batch_size, self.training = plan, batch_size, training
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.max_corrupt_fraction = shuffle_buffer, max_corrupt_fraction
        self.num_workers = effective_workers(len(plan.urls), world_size, num_workers, f"shard set '{plan.name}'")
        # the float stage runs in the loader's main process when it has a core of its own
        # (only uint8 crosses from the workers), else in the workers
        self.tail_in_main = self.batch_transform is not None and main_process_has_a_core(self.num_workers)
        self.epoch = 0  # start epoch of the training stream (set_epoch on resume reseeds it)
        self._live: Iterator | None = None
        # [worker, (seen, corrupt)] in shared memory: workers count, the main process reads
        self.stats = torch.zeros(max(1, self.num_workers), 2, dtype=torch.int64).share_memory_()
        self.total_samples = int(plan.keep.sum())
        self.batches_per_worker = self._train_batches_per_worker() if training else None

    # -- sizes known before streaming
    def worker_samples(self, worker: int, rank: int | None = None) -> int:
        rank = self.rank if rank is None else rank
        shards = assigned_shards(list(range(len(self.plan.urls))), rank, self.world_size, worker, self.slots)
        return sum(self.plan.kept_in_shard(s) for s in shards)

    def batches_of_rank(self, rank: int) -> int:
        """Evaluation batches rank `rank` yields: ranks differ, so gather once at the end (or pad)."""
        if self.training:
            return self.num_batches
        return sum(-(-self.worker_samples(w, rank) // self.batch_size) for w in range(self.slots))

    @property
    def slots(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (evaluation: exact unless shards are corrupt)."""
        if self.training:
            return self.num_batches * self.batch_size
        return sum(self.worker_samples(w) for w in range(self.slots))

    @property
    def num_batches(self) -> int:
        if self.training:
            return self.batches_per_worker * self.slots
        return self.batches_of_rank(self.rank)

    def _train_batches_per_worker(self) -> int:
        per_rank = self.total_samples // (self.world_size * self.batch_size)
        per_worker = per_rank // self.slots
        if per_worker < 1:
            raise DataError(f"shard set '{self.plan.name}' has {self.total_samples} training samples: too few for "
                            f"{self.world_size} ranks x {self.slots} workers x batch {self.batch_size}; lower "
                            "data.batch_size or data.num_workers")
        return per_worker

    # -- counting corrupt samples
    def _corrupt(self, worker: int, reason: str, url: str, key: Any, count: int = 1) -> None:
        self.stats[worker, 0] += count
        self.stats[worker, 1] += count
        seen, bad = int(self.stats[worker, 0]), int(self.stats[worker, 1])
        if bad <= MAX_LOGGED_CORRUPT:
            log.warning("skipping %d corrupt sample(s) in %s (key %s): %s", count, url, key, reason)
        if seen >= EARLY_CHECK_MIN_SAMPLES and bad > self.max_corrupt_fraction * seen:
            raise DataError(too_corrupt_message(self.plan.name, seen, bad, self.max_corrupt_fraction))

    # -- the sample stream: raw (cheap checks) -> [shuffle raw bytes] -> decode + transform -> batch
    def _shard_raw(self, shard: int, worker: int) -> Iterator[tuple[dict, int]]:
        """(member dict, id) of this loader's samples in one shard, each id at most once.

        Corrupt samples are counted as SAMPLES: the shard's loss is the number of this loader's
        ids that did not arrive (bad keys, ids out of range, a truncated tar), counted once at
        the shard's end, whatever number of tar members or member groups carried the damage (a
        sample whose members are split apart yields several groups; only its first is used, and
        decoding it counts it once). Groups that name no id of this loader count nothing."""
        plan, url = self.plan, self.plan.urls[shard]
        start = int(plan.starts[shard])
        end = int(plan.starts[shard + 1]) if shard + 1 < len(plan.starts) else len(plan.keep)
        expected, got, errors = plan.kept_in_shard(shard), set(), []
        with contextlib.closing(iter_shard(url, lambda u, e: errors.append(e))) as samples:
            for sample in samples:
                check_members(sample, url)
                try:
                    sid = parse_id(sample)
                    if not start <= sid < end:
                        raise CorruptSample(f"id {sid} is outside this shard's ids [{start}, {end}); index and "
                                            "shards do not match")
                except CorruptSample as err:
                    errors.append(err)
                    continue
                if plan.keep[sid] and sid not in got:
                    got.add(sid)
                    yield sample, sid
        if len(got) < expected:
            reason = f"truncated or unreadable shard ({errors[0]})" if errors else "shard ended early"
            self._corrupt(worker, f"{reason}: {expected - len(got)} of {expected} samples missing", url, "-",
                          expected - len(got))

    def _raw(self, shards: list[int], worker: int) -> Iterator[tuple[dict, int]]:
        for shard in shards:
            if self.plan.kept_in_shard(shard) == 0:
                continue  # nothing of this loader's role in it: do not even open it
            with contextlib.closing(self._shard_raw(shard, worker)) as samples:
                yield from samples

    def _endless_raw(self, worker: int, epoch: int) -> Iterator[tuple[dict, int]]:
        """Training: passes over this worker's shards, re-permuted each pass (same order on every rank)."""
        empty_passes = 0
        for cycle in itertools.count():
            order = np.random.default_rng([self.seed, epoch, cycle]).permutation(len(self.plan.urls)).tolist()
            shards = assigned_shards(order, self.rank, self.world_size, worker, self.slots)
            produced = 0
            with contextlib.closing(self._raw(shards, worker)) as samples:
                for item in samples:
                    produced += 1
                    yield item
            empty_passes = 0 if produced else empty_passes + 1
            if empty_passes > max(10, len(self.plan.urls)):
                raise DataError(f"shard set '{self.plan.name}': rank {self.rank} worker {worker} read no usable "
                                f"training sample in {empty_passes} passes; check the shards with make_shards "
                                "--verify-only")

    def _decoded(self, raw: Iterator[tuple[dict, int]], worker: int) -> Iterator[tuple[Any, int, int]]:
        """(transformed image, open-set label, id); corrupt samples are counted and skipped."""
        plan = self.plan
        for sample, sid in raw:
            try:
                original = parse_label(sample)
                if original != plan.original[sid]:
                    raise CorruptSample(f"label {original} differs from the index's {plan.original[sid]}")
                if self.decode_on == "device":
                    image = device_payload(sample, plan.image_mode)
                else:
                    image = decode_image(sample, plan.image_mode)
            except CorruptSample as err:
                self._corrupt(worker, str(err), sample.get("__url__", "?"), sample.get("__key__"))
                continue
            self.stats[worker, 0] += 1
            label = int(plan.table[original]) if original >= 0 else -1
            yield (self.transform(image) if self.transform else image), label, sid

    def _batches(self, worker: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Training: one endless stream; evaluation: one pass. Closes its shard when closed."""
        if self.training:
            stages = [self._endless_raw(worker, epoch)]
            if self.shuffle_buffer > 1:  # shuffle encoded bytes: decode only what is yielded, keep memory small
                rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}")
                shuffle = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)
                stages.append(shuffle(stages[-1]))
        else:
            shards = assigned_shards(list(range(len(self.plan.urls))), self.rank, self.world_size, worker, self.slots)
            stages = [self._raw(shards, worker)]
        stages.append(self._decoded(stages[-1], worker))
        collation = collate_encoded if self.decode_on == "device" else \
            functools.partial(collate, batch_transform=None if self.tail_in_main else self.batch_transform)
        stages.append(wds.batched(self.batch_size, collation_fn=collation, partial=not self.training)(stages[-1]))
        try:
            yield from stages[-1]
        finally:
            for stage in reversed(stages):  # closes the open shard even when stopped mid-shard
                stage.close()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if not self.training:
            with contextlib.closing(self._batches(worker, 0)) as batches:
                yield from batches
            return
        # with_epoch: an epoch is the next `batches_per_worker` batches of a stream that lives
        # on (persistent workers / num_workers=0), so the shuffle buffer is neither refilled
        # nor thrown away at every epoch boundary
        if self._live is None:
            self._live = self._batches(worker, self.epoch)
        yield from itertools.islice(self._live, self.batches_per_worker)

    def close(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None


def too_corrupt_message(name: str, seen: int, bad: int, limit: float) -> str:
    return (f"shard set '{name}': {bad} of {seen} samples corrupt ({bad / max(seen, 1):.1%} > "
            f"data.shards.max_corrupt_fraction={limit}); check the shards with tools/make_shards.py --verify-only")


# ---------------------------------------------------------------- the loader
def shard_worker_init(worker_id: int) -> None:
    """Heap reuse, and SIGTERM/SIGUSR1 left to the main process: Slurm signals the whole
    process group, and a worker that died first would fail the run before it checkpoints."""
    worker_init(worker_id)
    ignore_stop_signals(worker_id)


_WRAPPED = re.compile(r"(?:[\w.]*DataError): (.*)$")


class ShardLoader:
    """A DataLoader over a `ShardStream` that knows its length and its corrupt-sample counts.

    Not for `accelerator.prepare`: it already yields this rank's share.
    """

    def __init__(self, stream: ShardStream, seed: int = 0) -> None:
        self.dataset, self.seed = stream, seed
        self.batch_size = stream.batch_size
        self._loader: DataLoader | None = None

    def set_epoch(self, epoch: int) -> None:
        """Seed the training stream for a run resumed at `epoch`; call before the first iteration."""
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        return self.dataset.num_batches

    def iter_from(self, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This epoch's batches from batch `skip` on: the stream is seeded per epoch, so
        dropping the first `skip` batches reproduces a resumed run's position."""
        return itertools.islice(iter(self), skip, None)

    def batches_per_rank(self) -> list[int]:
        """Batches of every rank (equal in training; in evaluation they may differ)."""
        return [self.dataset.batches_of_rank(r) for r in range(self.dataset.world_size)]

    @property
    def num_samples(self) -> int:
        return self.dataset.num_samples

    def corrupt_counts(self) -> tuple[int, int]:
        """(samples seen, samples corrupt) summed over workers, all epochs so far."""
        seen, bad = self.dataset.stats.sum(0).tolist()
        return int(seen), int(bad)

    def _data_loader(self) -> DataLoader:
        stream = self.dataset
        generator = torch.Generator().manual_seed(hash((self.seed, stream.rank, stream.epoch)) & 0x7FFFFFFF)
        # training workers persist so that their stream (and shuffle buffer) continues across epochs
        return DataLoader(stream, batch_size=None, num_workers=stream.num_workers, generator=generator,
                          pin_memory=torch.cuda.is_available(), worker_init_fn=shard_worker_init,
                          persistent_workers=stream.training and stream.num_workers > 0,
                          **worker_processes(stream.num_workers))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        stream = self.dataset
        if stream.training:
            if self._loader is None:
                self._loader = self._data_loader()
            loader = self._loader
        else:
            loader = self._data_loader()
        batches, failure = iter(loader), None
        tail, pin = (stream.batch_transform if stream.tail_in_main else None), torch.cuda.is_available()
        keep_freed_memory()  # batches are allocated here too (data/heap_reuse.py)
        try:
            for images, labels, ids in batches:
                yield (images if tail is None else tail(images, pin_memory=pin)), labels, ids
        except DataError as err:  # from a worker: keep the one line, drop the worker traceback
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            match = _WRAPPED.search(lines[-1]) if lines else None
            failure = match.group(1) if match else str(err)
            traceback.clear_frames(err.__traceback__)  # break the frame cycle holding the worker iterator
            self._loader = None
        except RuntimeError as err:  # torch's "DataLoader timed out after N seconds"
            if "timed out" not in str(err):
                raise
            failure = (f"shard set '{stream.plan.name}': a loader worker delivered nothing for {loader.timeout} s "
                       "(hung shard read: a pipe: command or stalled storage); check the shards' location")
            self._loader = None
        finally:
            del batches, loader  # shut non-persistent workers down now, not when a traceback is collected
        if failure is not None:
            raise DataError(failure)  # outside `except`: no chained context keeps the workers alive
        seen, bad = self.corrupt_counts()
        if bad > stream.max_corrupt_fraction * seen:
            raise DataError(too_corrupt_message(stream.plan.name, seen, bad, stream.max_corrupt_fraction))
        if bad:
            log.warning("shard set '%s': skipped %d corrupt of %d samples so far", stream.plan.name, bad, seen)

    def close(self) -> None:
        """Stop persistent workers and close the open shard of the training stream."""
        self._loader = None
        self.dataset.close()


# ---------------------------------------------------------------- plans from the config
@dataclass
class ShardSet:
    """An opened index: counts and labels, ready to make plans from."""

    index: ShardIndex
    index_file: Any
    urls: list[str]
    starts: np.ndarray
    labels: np.ndarray

    @classmethod
    def open(cls, spec: str | None, root: str, what: str, allow_url_schemes: bool | None = None) -> ShardSet:
        if not spec:
            raise DataError(f"data.format=shards needs {what}; set it to a prefix made by tools/make_shards.py")
        index, path = read_index(spec, root)
        labels = read_labels(index, path)
        starts = np.concatenate([[0], np.cumsum([s.samples for s in index.shards])[:-1]]).astype(np.int64)
        urls = shard_urls(index, path, allow_url_schemes=allow_url_schemes)
        missing = [u for u in urls if local_path(u) is not None and not os.path.isfile(local_path(u))]
        if missing:
            raise DataError(f"{len(missing)} of {len(urls)} shards listed in {path} are missing (e.g. {missing[0]}); "
                            "copy them next to the index or set its base_url")
        return cls(index, path, urls, starts, labels)

    def plan(self, name: str, keep: np.ndarray, table: np.ndarray) -> StreamPlan:
        return StreamPlan(name, self.urls, self.starts, keep, self.labels, table, self.index.image_mode)

    def split_validation(self, known: np.ndarray, fraction: float, seed: int,
                         stratified: Callable) -> tuple[np.ndarray, np.ndarray]:
        """(train ids, val ids) of the known training samples.

        Whole shards go to validation when the shards are class-mixed (written shuffled) and
        there are enough of them: validation then reads `fraction` of the shards instead of
        every training shard each time, and training never reads validation samples.
        Otherwise a stratified per-sample slice (`stratified`, as in the native format).
        """
        n = len(self.index.shards)
        n_val = int(round(n * fraction))
        if fraction <= 0 or self.index.made_with.get("seed") is None or not 1 <= n_val < n:
            return stratified(known, self.labels, fraction, seed)
        val_shards = np.random.default_rng(seed).choice(n, n_val, replace=False)
        ends = np.append(self.starts[1:], len(self.labels))
        in_val = np.zeros(len(self.labels), dtype=bool)
        for shard in val_shards:
            in_val[self.starts[shard]:ends[shard]] = True
        return known[~in_val[known]], known[in_val[known]]


def _mask(n: int, indices: np.ndarray) -> np.ndarray:
    keep = np.zeros(n, dtype=bool)
    keep[indices] = True
    return keep


def _check_same_classes(train: ShardIndex, other: ShardIndex, where: str) -> None:
    if (train.wnids or train.classes) != (other.wnids or other.classes):
        raise DataError(f"{where} has other classes than the training shards ({other.num_classes} vs "
                        f"{train.num_classes}); make it with --classes-from the training index")


def build_shard_loaders(data_cfg: Any, split: Any, train_transform: Callable, test_transform: Callable, seed: int,
                        *, rank: int | None = None, world_size: int | None = None,
                        num_workers: int | None = None, stats_transform: Callable | None = None) -> dict[str, Any]:
    """Loaders of a `data.format: shards` run: train, val, train_eval, test, ood{name}, metadata.

    rank/world_size default to `dist_info()`; pass them to build another rank's view
    (tests). One training shard set serves train, val and train_eval; which samples each
    takes is the run's open-set selection (`open_set.select_*`), the same as for files on
    disk; labels follow `split.label_map`.
    """
    if getattr(split, "unknown_dataset", None):
        raise DataError(f"split '{split.name}' takes unknowns from a second data set ({split.unknown_dataset}); "
                        "data.format=shards does not support that - use data.format=native")
    auto_rank, auto_world = dist_info()
    rank = auto_rank if rank is None else rank
    world = auto_world if world_size is None else world_size
    workers = data_cfg.num_workers if num_workers is None else num_workers
    check_rank(rank, world)
    cfg = data_cfg.shards
    train_set = ShardSet.open(cfg.train, data_cfg.root, "data.shards.train", cfg.allow_url_schemes)
    test_set = ShardSet.open(cfg.test, data_cfg.root, "data.shards.test", cfg.allow_url_schemes)
    _check_same_classes(train_set.index, test_set.index, str(test_set.index_file))
    num_original = train_set.index.num_classes
    table = split.label_map(num_original)

    val_split = lambda known, labels, fraction, sub_seed: train_set.split_validation(  # noqa: E731
        known, fraction, sub_seed, train_val_split)
    chosen = select_training(train_set.labels, split, data_cfg, seed, num_original, val_split)
    test_idx = select_test(test_set.labels, split, data_cfg, seed, num_original)

    common = dict(rank=rank, world_size=world, num_workers=workers, seed=seed,
                  shuffle_buffer=cfg.shuffle_buffer, max_corrupt_fraction=cfg.max_corrupt_fraction,
                  decode_on=cfg.decode_on)

    def loader(shard_set: ShardSet, name: str, idx: np.ndarray, training: bool,
               labels: np.ndarray = table, transform: Callable | None = None) -> ShardLoader:
        plan = shard_set.plan(name, _mask(len(shard_set.labels), idx), labels)
        transform = transform or (train_transform if training else test_transform)
        batch = data_cfg.batch_size if training else data_cfg.eval_batch_size
        return ShardLoader(ShardStream(plan, transform, batch_size=batch, training=training, **common), seed)

    ood, ood_counts, groups = {}, {}, {}
    for i, entry in enumerate(ood_entries(data_cfg, split)):
        if not entry.shards:
            raise DataError(f"data.ood[{i}] ('{entry.name}') has no 'shards' prefix; data.format=shards needs one "
                            "(tools/make_shards.py --source ood ...)")
        ood_set = ShardSet.open(entry.shards, data_cfg.root, f"the shards of OOD set '{entry.name}'",
                                cfg.allow_url_schemes)
        idx = select_ood(ood_set.labels, data_cfg, seed)
        all_unknown = np.full(max(ood_set.index.num_classes, int(ood_set.labels.max()) + 1, 1), -1)
        ood[entry.name] = loader(ood_set, entry.name, idx, False, all_unknown)  # unknown whatever the shards say
        ood_counts[entry.name] = len(idx)
        groups[entry.name] = entry.group

    names = train_set.index.classes
    return {
        "train": loader(train_set, "train", chosen.train, True),
        "val": loader(train_set, "val", chosen.val, False) if len(chosen.val) else None,
        "train_eval": loader(train_set, "train_eval", chosen.train_eval, False),
        # the same images augmented: the reference protocol's z-normalisation moments
        "train_eval_augmented": None if stats_transform is None else
        loader(train_set, "train_eval", chosen.train_eval, False, transform=stats_transform),
        "test": loader(test_set, "test", test_idx, False),
        "ood": ood,
        "metadata": {
            "num_classes": len(split.known),
            "class_names": [names[k] for k in split.known],
            "counts": {"train": len(chosen.train), "val": len(chosen.val), "train_eval": len(chosen.train_eval),
                       "test": len(test_idx), "test_unknown": int((table[test_set.labels[test_idx]] < 0).sum()),
                       "ood": ood_counts},
            "ood_groups": groups,
            "index": {"train": str(train_set.index_file), "test": str(test_set.index_file)},
            "test_original_labels": test_set.labels,  # by sample id: per-unknown-class AUROC
            "original_class_names": list(test_set.index.classes),
            "rank": rank,
            "world_size": world,
        },
    }


class StagedLoader:
    """A shard loader whose batches go through a device stage (decode + augment on the GPU,
    `data.shards.decode_on: device`), so the engine sees ready batches for either setting."""

    def __init__(self, loader: ShardLoader, stage: Callable[[tuple], tuple]):
        self.loader, self.stage = loader, stage

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def iter_from(self, skip: int) -> Iterator:
        return map(self.stage, self.loader.iter_from(skip))

    def __iter__(self) -> Iterator:
        return map(self.stage, iter(self.loader))

    def corrupt_counts(self) -> tuple[int, int]:
        return self.loader.corrupt_counts()

    def close(self) -> None:
        self.loader.close()


def _staged(loaders: dict[str, Any], data_cfg: Any, device: Any, seed: int, rank: int,
            augmented_statistics: bool) -> dict[str, Any]:
    """Every loader wrapped in its device stage when data.shards.decode_on=device (else as is)."""
    train = device_stage(data_cfg, training=True, device=device, seed=seed * 1000 + rank)
    if train is None:
        return loaders
    test = device_stage(data_cfg, training=False, device=device)
    stats = device_stage(data_cfg, training=True, device=device, seed=seed * 1000 + rank + 1) \
        if augmented_statistics else test
    wrap = lambda loader, stage: None if loader is None else StagedLoader(loader, stage)  # noqa: E731
    return {**loaders, "train": wrap(loaders["train"], train), "val": wrap(loaders["val"], test),
            "train_eval": wrap(loaders["train_eval"], test),
            "train_eval_augmented": wrap(loaders["train_eval_augmented"], stats), "test": wrap(loaders["test"], test),
            "ood": {name: wrap(loader, test) for name, loader in loaders["ood"].items()}}


def training_classes(data_cfg: Any, dataset: str) -> list[str]:
    """Original class names of the training shards (their index; `dataset` is the index's own)."""
    return list(read_index(data_cfg.shards.train or "", data_cfg.root)[0].classes)


def read(data_cfg: Any, seed: int, rank: int, world: int, *, train_tf: Callable, test_tf: Callable,
         stats_tf: Callable | None = None, augmented_statistics: bool = False, device: Any = "cpu") -> RunData:
    """This rank's share of every set from WebDataset shards: the loaders above as a `RunData`."""
    split = resolve_run_split(data_cfg, lambda: len(training_classes(data_cfg, data_cfg.dataset)))
    loaders = build_shard_loaders(data_cfg, split, train_tf, test_tf, seed, rank=rank, world_size=world,
                                  stats_transform=stats_tf)
    meta = loaders["metadata"]
    original = meta["test_original_labels"]
    loaders = _staged(loaders, data_cfg, device, seed, rank, augmented_statistics)
    return RunData(
        train=loaders["train"], val=loaders["val"], train_eval=loaders["train_eval"], test=loaders["test"],
        ood=loaders["ood"], train_eval_augmented=loaders["train_eval_augmented"],
        meta=DataMeta(split=split, num_classes=meta["num_classes"], class_names=meta["class_names"],
                      test_original_of=lambda ids: original[ids], original_class_names=meta["original_class_names"],
                      ood_groups=meta["ood_groups"], counts=meta["counts"]),
    )
