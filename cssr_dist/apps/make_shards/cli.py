"""`make_shards`: raw data set -> WebDataset shards + `<prefix>.json` index (+ `--verify`).

    cssr-make-shards --source imagefolder --root /data/imagenet/train \\
        --dataset imagenet --subset train --out /shards/imagenet-train --workers 16 --verify

The plan (sample order, ids, shard boundaries) is a pure function of the listing and the
options, so a rerun after an interruption writes only the shards that were not finished
(each shard is written under a temporary name and renamed when complete), and a changed
option is detected instead of silently mixing two plans.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import sys
from collections import Counter
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from ... import __version__
from ...data import layouts as src
from ...data import openood
from ...data.shards.index import (
    ShardIndex,
    ShardInfo,
    index_path,
    labels_name,
    local_path,
    read_index,
    read_labels,
    shard_name,
    shard_urls,
    write_index,
    write_labels,
)
from ...data.shards.samples import CorruptSample, check_members, decode_image, iter_shard, parse_id, parse_label
from ...data.sources import build_source
from ...errors import CssrError, DataError, report
from ...data.layouts import Record
from .writer import EncodeOptions, encode_bytes, encode_pil, make_sample, plan_shards, write_shard

SOURCES = ("torchvision", "imagefolder", "flat", "tinyimagenet", "ood", "filelist")


# ---------------------------------------------------------------- listing
def list_torchvision(name: str, root: str | Path, train: bool) -> src.Listing:
    """A torchvision-format set through the project's `build_source` (images re-encoded as PNG)."""
    source = build_source(name, str(root), train)
    targets = [int(t) for t in source.targets]
    subset = "train" if train else "test"
    records = [Record(i, t, f"{name}/{subset}/{i}") for i, t in enumerate(targets)]
    image, _ = source[0]
    classes = [str(c) for c in getattr(source, "classes", range(max(targets) + 1))]
    return src.Listing(name, subset, "torchvision", str(root), classes, records, image_mode=image.mode,
                   memory_source=(name, str(root), train))


def listing_from_args(args: argparse.Namespace) -> src.Listing:
    """The records of `--source` (see shard_sources for each layout)."""
    dataset = args.dataset or Path(args.root or args.list or "data").name
    if args.source == "torchvision":
        if not args.dataset:
            raise DataError("--source torchvision needs --dataset (cifar10, cifar100, svhn, mnist, fashion_mnist)")
        return list_torchvision(args.dataset, args.root, train=args.subset == "train")
    if args.source == "imagefolder":
        return src.list_imagefolder(args.root, dataset, args.subset, args.class_names)
    if args.source == "flat":
        if not args.labels:
            raise DataError("--source flat needs --labels (ground truth, LOC_val_solution.csv or 'name wnid' file)")
        return src.list_flat(args.root, args.labels, dataset, args.subset, args.label_format, args.id_map,
                             args.classes_from, args.class_names)
    if args.source == "tinyimagenet":
        return src.list_tinyimagenet(args.root, args.subset)
    if args.source == "ood":
        return src.list_ood(args.root, dataset)
    if args.source == "filelist":
        if not args.list:
            raise DataError("--source filelist needs --list FILE of 'path label' lines")
        expected = expected_list_lines(args.list, args.expect_lines)
        listing = src.list_filelist(args.list, args.root, dataset, args.subset, args.class_names, args.classes_from,
                                    expected)
        if expected is not None:
            source = "--expect-lines" if args.expect_lines else "OpenOOD v1.5's published size"
            print(f"{args.list}: {expected} lines, as expected ({source})")
        return listing
    raise DataError(f"--source {args.source!r} unknown; choose one of {', '.join(SOURCES)}")


def expected_list_lines(list_file: str, given: int | None) -> int | None:
    """--expect-lines N (0: no check), else the published size of an OpenOOD v1.5 list of that name."""
    if given is not None:
        if given < 0:
            raise DataError(f"--expect-lines {given}: give a line count, or 0 for no check")
        return given or None
    return openood.expected_lines(list_file)


# ---------------------------------------------------------------- encoding one shard (worker side)
_MEMORY_SOURCES: dict[tuple, Any] = {}


def _memory_source(spec: tuple[str, str, bool]) -> Any:
    if spec not in _MEMORY_SOURCES:
        _MEMORY_SOURCES[spec] = build_source(*spec)
    return _MEMORY_SOURCES[spec]


def _encoded_samples(items: list[tuple[int, Record]], opts: EncodeOptions, memory: tuple | None) -> Iterable[dict]:
    for sample_id, record in items:
        if memory is not None:
            image, _ = _memory_source(memory)[record.ref]
            ext, data = encode_pil(image, opts)
        else:
            try:
                data = Path(record.ref).read_bytes()
            except OSError as err:
                raise DataError(f"cannot read source image {record.ref}: {err}") from None
            ext, data = encode_bytes(data, opts, str(record.ref))
        yield make_sample(sample_id, ext, data, record.label, record.name)


def _pool_context() -> BaseContext:
    """Worker processes start fresh ("spawn"), never forked from this process.

    Why: a forked child inherits every lock another thread held at fork time (tqdm's monitor,
    torch's pools, logging) and Python-level signal handlers (the trainer's SIGTERM handler),
    so a forked writer can deadlock and then ignore the pool's SIGTERM: the parent waits
    forever. Workers rebuild an in-memory source once each from its (name, root, train) spec.
    """
    return get_context("spawn")


def _write_task(task: tuple) -> ShardInfo:
    path, items, opts, memory = task
    return write_shard(path, _encoded_samples(items, opts, memory))


# ---------------------------------------------------------------- planning
@dataclasses.dataclass(frozen=True)
class ShardOptions:
    samples_per_shard: int = 1000
    max_bytes: int | None = None
    shuffle: bool = True
    seed: int = 0
    encode: EncodeOptions = EncodeOptions()
    workers: int = 1
    overwrite: bool = False
    progress: bool = True


def _sizes(listing: src.Listing, order: Sequence[int], opts: ShardOptions) -> list[int]:
    """Byte estimates for `--max-bytes` planning: source file sizes, raw pixels in memory."""
    if opts.max_bytes is None:
        return [0] * len(order)
    if listing.memory_source is not None:
        image, _ = _memory_source(listing.memory_source)[0]
        return [image.width * image.height * len(image.getbands())] * len(order)
    return [os.path.getsize(listing.records[i].ref) for i in order]


def _fingerprint(listing: src.Listing, order: Sequence[int], shards: list[range], opts: ShardOptions) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([listing.dataset, listing.kind, listing.classes, dataclasses.asdict(opts.encode),
                              [len(s) for s in shards]]).encode())
    for i in order:
        record = listing.records[i]
        digest.update(f"{record.name}\0{record.label}\n".encode())
    return digest.hexdigest()[:16]


def _existing_outputs(prefix: Path) -> list[Path]:
    pattern = re.compile(re.escape(prefix.name) + r"-\d{6}\.tar(\.tmp)?$")
    parent = prefix.parent if prefix.parent.is_dir() else None
    found = [p for p in parent.iterdir() if pattern.match(p.name)] if parent else []
    extras = [index_path(prefix), prefix.with_name(labels_name(prefix)), _partial_path(prefix)]
    return found + [p for p in extras if p.exists()]


def _partial_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".partial.json")


def _check_resume(prefix: Path, fingerprint: str, overwrite: bool) -> None:
    """Allow resuming only the same plan; refuse to mix plans unless --overwrite."""
    existing = _existing_outputs(prefix)
    if overwrite:
        for path in existing:
            path.unlink()
        return
    if not existing:
        return
    marker = _partial_path(prefix)
    previous = None
    if marker.exists():
        previous = json.loads(marker.read_text()).get("fingerprint")
    elif index_path(prefix).exists():
        previous = json.loads(index_path(prefix).read_text()).get("made_with", {}).get("plan_fingerprint")
    if previous != fingerprint:
        raise DataError(f"{prefix}: shards from a different plan (other source/options) exist; pass --overwrite "
                        "to replace them or choose another --out")


def make_shard_set(listing: src.Listing, out: str | os.PathLike, opts: ShardOptions,
                   command: str = "", source_args: dict | None = None) -> ShardIndex:
    """Write the shards of `listing` under prefix `out` and its index; returns the index."""
    prefix = Path(os.fspath(out))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    n = len(listing.records)
    order = np.random.default_rng(opts.seed).permutation(n).tolist() if opts.shuffle else list(range(n))
    shards = plan_shards(_sizes(listing, order, opts), opts.samples_per_shard, opts.max_bytes)
    fingerprint = _fingerprint(listing, order, shards, opts)
    _check_resume(prefix, fingerprint, opts.overwrite)
    _partial_path(prefix).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")

    encode = opts.encode
    if listing.memory_source is not None and encode.encoding == "original":
        encode = dataclasses.replace(encode, encoding="png")  # in-memory arrays have no original bytes
    names = [shard_name(prefix, i) for i in range(len(shards))]
    todo = [(prefix.with_name(names[i]), [(sid, listing.records[order[sid]]) for sid in ids], encode,
             listing.memory_source) for i, ids in enumerate(shards) if not prefix.with_name(names[i]).exists()]
    skipped = len(shards) - len(todo)
    if skipped:  # the plan is the same (checked above): finished shards are kept, not rewritten
        print(f"resuming {prefix}: {skipped} of {len(shards)} shards were written by an earlier run of the same "
              f"plan and are kept; writing the other {len(todo)}", flush=True)
    bar = tqdm(total=n, unit="img", desc=f"shards {prefix.name}", disable=not opts.progress, smoothing=0.1)
    bar.update(sum(len(s) for s, name in zip(shards, names) if prefix.with_name(name).exists()))
    if opts.workers > 1 and len(todo) > 1:
        with _pool_context().Pool(opts.workers) as pool:
            for info in pool.imap_unordered(_write_task, todo):
                bar.update(info.samples)
    else:
        for task in todo:
            bar.update(_write_task(task).samples)
    bar.close()

    labels = np.array([listing.records[i].label for i in order], dtype=np.int64)
    infos = [ShardInfo(name, len(ids), prefix.with_name(name).stat().st_size) for name, ids in zip(names, shards)]
    counts = Counter(labels.tolist())
    write_labels(prefix, labels)
    index = ShardIndex(
        dataset=listing.dataset, subset=listing.subset, classes=listing.classes, wnids=listing.wnids, shards=infos,
        class_counts=[counts.get(k, 0) for k in range(len(listing.classes))], unknown_count=counts.get(-1, 0),
        total=n, image_encoding=encode.describe(),
        image_mode=listing.image_mode, labels_file=labels_name(prefix),
        made_with={"command": command, "source": {"kind": listing.kind, "root": listing.root, **(source_args or {})},
                   "seed": opts.seed if opts.shuffle else None, "samples_per_shard": opts.samples_per_shard,
                   "max_bytes": opts.max_bytes, "plan_fingerprint": fingerprint, "resumed_shards": skipped,
                   "skipped_files": dict(listing.skipped.counts),
                   "cssr_dist_version": __version__,
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    )
    write_index(prefix, index)
    _partial_path(prefix).unlink(missing_ok=True)
    return index


# ---------------------------------------------------------------- verification
def _verify_task(task: tuple[str, int, int, np.ndarray, str | None]) -> tuple[list[int], list[str]]:
    url, start, expected, labels, mode = task
    ids, problems, errors = [], [], []
    for sample in iter_shard(url, lambda u, e: errors.append(e)):
        key = sample.get("__key__")
        try:
            check_members(sample, url)
            sid = parse_id(sample)
            if not start <= sid < start + expected:
                raise CorruptSample(f"id {sid} outside the shard's range [{start}, {start + expected})")
            label = parse_label(sample)
            if label != labels[sid - start]:
                raise CorruptSample(f"label {label} but the index says {labels[sid - start]}")
            decode_image(sample, mode)
            ids.append(sid)
        except (CorruptSample, DataError) as err:
            problems.append(f"{url}: sample {key}: {err}")
    for err in errors:
        problems.append(f"{url}: unreadable tar ({type(err).__name__}: {err})")
    if len(ids) != expected:
        problems.append(f"{url}: {len(ids)} good samples, index says {expected}")
    return ids, problems


def verify_shard_set(spec: str | os.PathLike, workers: int = 1, progress: bool = False) -> list[str]:
    """Read every shard back: counts, ids 0..N-1 each once, labels, decodability, allowed members."""
    index, path = read_index(os.fspath(spec))
    labels = read_labels(index, path)
    starts = np.concatenate([[0], np.cumsum([s.samples for s in index.shards])]).astype(int)
    tasks = [(url, int(starts[i]), s.samples, labels[starts[i]:starts[i + 1]], index.image_mode)
             for i, (url, s) in enumerate(zip(shard_urls(index, path), index.shards))]
    problems, seen = [], Counter()
    missing = [t[0] for t in tasks if local_path(t[0]) is not None and not Path(local_path(t[0])).is_file()]
    problems += [f"{url}: shard file missing" for url in missing]
    tasks = [t for t in tasks if t[0] not in missing]
    bar = tqdm(total=len(tasks), unit="shard", desc="verify", disable=not progress)
    if workers > 1 and len(tasks) > 1:
        with _pool_context().Pool(workers) as pool:
            results = list(pool.imap(_verify_task, tasks))
    else:
        results = [_verify_task(t) for t in tasks]
    for ids, found in results:
        seen.update(ids)
        problems += found
        bar.update(1)
    bar.close()
    duplicated = [i for i, c in seen.items() if c > 1]
    if duplicated:
        problems.append(f"{len(duplicated)} sample ids occur more than once (e.g. {duplicated[0]})")
    return problems


# ---------------------------------------------------------------- command line
def parse_size(text: str) -> int:
    """'500M', '1G', '2000000' -> bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 1G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_shards", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Layouts and label files: docs/shards.md")
    p.add_argument("--source", choices=SOURCES, help="layout of the raw data")
    p.add_argument("--root", help="data set folder (torchvision: data.root)")
    p.add_argument("--out", help="output prefix: writes PREFIX-000000.tar ..., PREFIX.json, PREFIX.labels.npy")
    p.add_argument("--dataset", help="data set name (torchvision: cifar10|cifar100|svhn|mnist|fashion_mnist)")
    p.add_argument("--subset", default="train", help="train | test | val (default train)")
    p.add_argument("--labels", help="flat: label file (ILSVRC2012_validation_ground_truth.txt, LOC_val_solution.csv, "
                                    "or 'filename wnid' lines)")
    p.add_argument("--label-format", default="auto", choices=src.LABEL_FORMATS)
    p.add_argument("--id-map", help="flat + ilsvrc-gt: devkit data/meta.mat or 'ILSVRC_id wnid' lines")
    p.add_argument("--classes-from", help="flat, filelist: class (wnid) order: training index .json, folder of class "
                                          "folders, or list")
    p.add_argument("--class-names", help="'wnid name' mapping (LOC_synset_mapping.txt, words.txt) or one name a line")
    p.add_argument("--list", help="filelist: 'path label' lines, paths relative to --root (OpenOOD's benchmark_imglist "
                                  "format)")
    p.add_argument("--expect-lines", type=int, help="filelist: the line count the list must have (default: OpenOOD "
                                                    "v1.5's published size for its list names, else none; 0: no check)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-bytes", type=parse_size, help="also cut shards at this many (source) bytes, e.g. 1G")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for the sample order (class-mixed shards)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted source order")
    p.add_argument("--encoding", choices=("original", "jpeg", "png"), default="original",
                   help="original = keep the file bytes (in-memory sets: PNG); jpeg/png = re-encode")
    p.add_argument("--resize", type=int, help="scale the shorter side down to this (e.g. 256); re-encodes")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different plan under --out")
    p.add_argument("--verify", action="store_true", help="read every shard back after writing")
    p.add_argument("--verify-only", metavar="PREFIX", help="only verify an existing shard set")
    p.add_argument("--no-progress", action="store_true")
    return p


def _verify_and_report(spec: str, workers: int, progress: bool) -> int:
    problems = verify_shard_set(spec, workers, progress)
    for line in problems[:50]:
        print(f"verify: {line}", file=sys.stderr)
    if len(problems) > 50:
        print(f"verify: ... {len(problems) - 50} more", file=sys.stderr)
    print(f"verify {spec}: {'FAILED, ' + str(len(problems)) + ' problems' if problems else 'ok'}")
    return 1 if problems else 0


def run(args: argparse.Namespace, command: str) -> int:
    progress = not args.no_progress
    if args.verify_only:
        return _verify_and_report(args.verify_only, args.workers, progress)
    if not args.source or not args.out:
        raise DataError("pass --source and --out (or --verify-only PREFIX); see --help")
    listing = listing_from_args(args)
    if listing.skipped.total():
        print(f"listed {len(listing.records)} images under {listing.root}; skipped {listing.skipped.total()} "
              f"entries: {listing.skipped.describe()}", flush=True)
    opts = ShardOptions(samples_per_shard=args.samples_per_shard, max_bytes=args.max_bytes,
                        shuffle=not args.no_shuffle, seed=args.seed,
                        encode=EncodeOptions(args.encoding, args.resize, args.quality), workers=args.workers,
                        overwrite=args.overwrite, progress=progress)
    source_args = {k: getattr(args, k) for k in ("labels", "label_format", "id_map", "classes_from", "list")
                   if getattr(args, k) not in (None, "auto")}
    index = make_shard_set(listing, args.out, opts, command, source_args)
    print(f"wrote {index.total} samples in {len(index.shards)} shards: {index_path(args.out)}")
    return _verify_and_report(args.out, args.workers, progress) if args.verify else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(shlex.quote(a) for a in ["make_shards", *argv])
    try:
        return run(build_parser().parse_args(argv), command)
    except CssrError as err:
        return report(err)


if __name__ == "__main__":
    sys.exit(main())
