#!/usr/bin/env python
"""Images/s of the shard loader vs an ImageFolder loader vs the decode+transform limit.

Generates ImageNet-like JPEGs (noise + shapes, ~500x375) into a temp dir, writes them as
shards (original bytes) and times, with the same training transform
(RandomResizedCrop 224 + flip + normalise) and batch size:

* limit:   decode + transform of in-memory JPEG bytes in one process, no loader at all
* folder:  torchvision ImageFolder + DataLoader(shuffle) with 1 and 2 workers
* shards:  cssr_dist.data.shards training loader (shuffle buffer, batching in workers)

Targets: shards >= 0.9 x limit per worker, and shards >= folder at the same workers.

    python -m benchmarks.bench_data                # 2000 images of 500x375
    python -m benchmarks.bench_data --quick        # CI smoke run (small, seconds)
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as tv_transforms

from cssr_dist.config import DataConfig
from cssr_dist.data.batch_transform import split_at_to_tensor
from cssr_dist.apps.make_shards.cli import ShardOptions, make_shard_set
from cssr_dist.data.layouts import list_imagefolder
from cssr_dist.data.readers.shards import build_shard_loaders
from cssr_dist.data.shards.samples import TAR_READER_ENV
from cssr_dist.data.splits import OpenSetSplit

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def train_transform(size: int) -> tv_transforms.Compose:
    return tv_transforms.Compose([tv_transforms.RandomResizedCrop(size), tv_transforms.RandomHorizontalFlip(), tv_transforms.ToTensor(), tv_transforms.Normalize(MEAN, STD)])


def fake_photo(rng: np.random.Generator, width: int, height: int) -> PIL.Image.Image:
    """Smooth background + random shapes + sensor-like noise: JPEG sizes close to ImageNet's (~110 kB)."""
    gy, gx = np.mgrid[0:height, 0:width]
    base = np.stack([(gx * rng.uniform(0.2, 0.6) + gy * rng.uniform(0.2, 0.6) + rng.uniform(0, 255)) % 256
                     for _ in range(3)], axis=-1)
    image = PIL.Image.fromarray(base.astype(np.uint8))
    draw = PIL.ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = [x0, y0, x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    return PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_images(root: Path, count: int, classes: int, width: int, height: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = root / f"class{i % classes:03d}" / f"img_{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = (width, height) if i % 4 else (height, width)  # some portrait images
        fake_photo(rng, w, h).save(path, quality=90)
        paths.append(path)
    return paths


def cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children, i.e. loader workers."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Meter:
    """Images per wall second and per CPU second (the latter barely moves when others load the CPUs)."""

    def __enter__(self) -> "Meter":
        gc.collect()
        self.images, self.wall, self.cpu = 0, time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        gc.collect()  # joins finished workers so that their CPU time is counted
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu

    def rates(self) -> tuple[float, float]:
        return self.images / self.wall, self.images / self.cpu


def bench_limit(blobs: list[bytes], transform, collate_batch: int = 0) -> tuple[float, float]:
    """Decode + transform in this process; with `collate_batch`, also stack batches (as any loader must)."""
    with Meter() as meter:
        batch = []
        for blob in blobs:
            with PIL.Image.open(io.BytesIO(blob)) as image:
                batch.append(transform(image.convert("RGB")))
            if collate_batch and len(batch) == collate_batch:
                torch.stack(batch)
            if len(batch) >= max(collate_batch, 1):
                batch = []
        meter.images = len(blobs)
    return meter.rates()


def drain(make_loader, epochs: int) -> tuple[float, float]:
    """Rates over `epochs` epochs, worker start-up and shutdown included (as a training run pays them)."""
    with Meter() as meter:
        loader = make_loader()
        for _ in range(epochs):
            for images, *_ in loader:
                meter.images += images.shape[0]
        getattr(loader, "close", lambda: None)()
        del loader
    return meter.rates()


def bench_folder(root: Path, transform, batch: int, workers: int, epochs: int) -> tuple[float, float]:
    """Like the project's native training loader: shuffle, drop_last, persistent workers."""
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return drain(lambda: DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                    persistent_workers=workers > 0), epochs)


def bench_shards(shard_dir: Path, classes: int, transform, batch: int, workers: int, epochs: int,
                 buffer: int) -> tuple[float, float]:
    cfg = DataConfig(format="shards", root=str(shard_dir), batch_size=batch, eval_batch_size=batch,
                     num_workers=workers, val_fraction=0.0)
    cfg.shards.train = cfg.shards.test = "bench"
    cfg.shards.shuffle_buffer = buffer
    split = OpenSetSplit("bench", tuple(range(classes)))
    return drain(lambda: build_shard_loaders(cfg, split, transform, transform, 0, rank=0, world_size=1)["train"],
                 epochs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0 = in the main process")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--buffers", type=int, nargs="+", default=[2000],
                   help="shard loader shuffle buffers to measure (data.shards.shuffle_buffer; first = judged)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per measurement (start-up amortised)")
    p.add_argument("--repeats", type=int, default=1, help="best of N interleaved runs per configuration")
    p.add_argument("--quick", action="store_true", help="CI smoke run: 128 small images, one epoch")
    p.add_argument("--tar-readers", nargs="+", default=["own"], choices=["own", "webdataset"],
                   help="tar readers of the shard loader to compare (CSSR_DIST_TAR_READER; first = judged)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.width, args.height, args.batch_size, args.samples_per_shard = 128, 160, 120, 16, 16
        args.epochs = 1
    torch.set_num_threads(1)
    transform = train_transform(args.size)
    results: dict = {"args": vars(args), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                     "load_before": os.getloadavg()[0]}
    runs: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        raw, shard_dir = Path(tmp) / "raw", Path(tmp) / "shards"
        paths = make_images(raw, args.images, args.classes, args.width, args.height)
        results["mean_jpeg_kb"] = round(sum(p.stat().st_size for p in paths) / len(paths) / 1024, 1)
        make_shard_set(list_imagefolder(raw, "bench", "train"), shard_dir / "bench",
                       ShardOptions(samples_per_shard=args.samples_per_shard, progress=False))
        blobs = [p.read_bytes() for p in paths]
        for _ in range(args.repeats):  # interleaved, best of N: other load on the machine hits all alike
            runs.setdefault("limit", []).append(bench_limit(blobs, transform))
            runs.setdefault("limit_stack", []).append(bench_limit(blobs, transform, args.batch_size))
            runs.setdefault("limit_uint8", []).append(bench_limit(blobs, split_at_to_tensor(transform)[0]))
            for workers in args.workers:
                runs.setdefault(f"folder_w{workers}", []).append(
                    bench_folder(raw, transform, args.batch_size, workers, args.epochs))
                for buffer in args.buffers:
                    for reader in args.tar_readers:
                        os.environ[TAR_READER_ENV] = reader  # read by the loader's worker processes too
                        key = f"shards_w{workers}_b{buffer}" + ("" if reader == args.tar_readers[0] else f"_{reader}")
                        runs.setdefault(key, []).append(bench_shards(
                            shard_dir, args.classes, transform, args.batch_size, workers, args.epochs, buffer))
                    os.environ.pop(TAR_READER_ENV, None)
    results["runs"] = runs
    best = {key: (max(r[0] for r in values), max(r[1] for r in values)) for key, values in runs.items()}
    results["best"] = best
    results["load_after"] = os.getloadavg()[0]
    results["targets_met"] = report(args, results, best)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def report(args: argparse.Namespace, results: dict, best: dict) -> dict[str, bool]:
    """Markdown table; targets judged on wall clock and on CPU-normalised throughput."""
    print(f"{args.images} JPEGs {args.width}x{args.height} (mean {results['mean_jpeg_kb']} kB), batch "
          f"{args.batch_size}, crop {args.size}, {args.epochs} epochs, best of {args.repeats}; load avg "
          f"{results['load_before']:.2f} -> {results['load_after']:.2f} on {results['machine']}")
    (limit, limit_cpu) = best["limit"]
    print("| loader | workers | images/s (wall) | per worker / limit | images per CPU-s | / limit "
          "| vs folder (wall, CPU) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| decode+transform limit | 1 process | {limit:.1f} | 1.00 | {limit_cpu:.1f} | 1.00 | |")
    stack, stack_cpu = best["limit_stack"]
    print(f"| decode+transform+stack | 1 process | {stack:.1f} | {stack / limit:.2f} | {stack_cpu:.1f} | "
          f"{stack_cpu / limit_cpu:.2f} | |")
    u8, u8_cpu = best["limit_uint8"]
    print(f"| decode+crop to uint8 (the shard worker's share; /255 + normalise run per batch) | 1 process | "
          f"{u8:.1f} | {u8 / limit:.2f} | {u8_cpu:.1f} | {u8_cpu / limit_cpu:.2f} | |")
    met = {"wall": True, "cpu": True}
    for workers in args.workers:
        (folder, folder_cpu) = best[f"folder_w{workers}"]
        (shards, shards_cpu) = best[f"shards_w{workers}_b{args.buffers[0]}"]
        procs = max(workers, 1)
        rows = [("folder (ImageFolder)", best[f"folder_w{workers}"])]
        rows += [(f"shards, buffer {b}", best[f"shards_w{workers}_b{b}"]) for b in args.buffers]
        rows += [(f"shards, buffer {b}, {r} tar reader", best[f"shards_w{workers}_b{b}_{r}"])
                 for b in args.buffers for r in args.tar_readers[1:]]
        for name, (wall, cpu) in rows:
            versus = f"{wall / folder:.2f}, {cpu / folder_cpu:.2f}"
            print(f"| {name} | {workers} | {wall:.1f} | {wall / procs / limit:.2f} | {cpu:.1f} | "
                  f"{cpu / limit_cpu:.2f} | {versus} |")
        if workers:
            met["wall"] &= shards / procs >= 0.9 * limit and shards >= folder
            met["cpu"] &= shards_cpu >= 0.9 * limit_cpu and shards_cpu >= folder_cpu
    verdict = {key: "met" if value else "NOT met" for key, value in met.items()}
    print(f"targets (shards, buffer {args.buffers[0]}: >= 0.9 x limit per worker and >= folder): "
          f"wall clock {verdict['wall']}, "
          f"CPU-normalised {verdict['cpu']}")
    return met


if __name__ == "__main__":
    sys.exit(main())
