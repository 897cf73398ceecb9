"""The prepared GPU run of issue 12 / issue 10 item 8: every figure in one go, under a time budget.

Prints ONE JSON line per measurement (appended to OUT/gpu_bench.jsonl as they finish) and
rewrites OUT/gpu_bench.md (summary) and OUT/scaling.md (the scaling arithmetic) after
every job, so a run killed by its time limit still leaves both. Jobs run cheapest and most
informative first; one that would overrun the budget is skipped with a JSON line saying
so; one that fails leaves an error line and the next one runs.

1. head    : the CSSR head alone, K=1000, C=2048 and C=512, latent 16, batch 64, 7x7,
             bf16, forward + backward: chunked vs fused (Triton) vs the per-class loop,
             through benchmarks/bench_head.py (its own subprocess per configuration).
2. sync    : `set_sync_debug_mode("error")` around ResNet-50 + RCSSR training steps.
3. ft      : frozen ResNet-50 and ViT-B/16 (timm `vit_base_patch16_224`, its 14x14
             patch-token map) with linear, PCSSR (projection 512, latent 32) and RCSSR
             (latent 16) heads, K=1000, 224 px, batch 64, bf16: training step images/s and
             peak memory, eager, chunked and fused L1. RANDOM weights (the machine has no
             network; a step's cost does not depend on the weights).
4. wrn     : WRN-40-4, 32 px, batch 128: fp32 / bf16 eager, torch.compile default and
             mode="reduce-overhead" (CUDA graphs).
5. decode  : JPEG shards written here (stdlib tar, the project's layout and index; no
             webdataset) read by the project's ShardLoader with `decode_on: device` and
             decoded + RandomResizedCrop(224) + flip + normalised on the GPU by
             `DeviceBatchStage`, in a child process pinned to 4 CPU cores (3 loader workers);
             the CPU path (PIL, project ImageNet transform) on the same 4 cores beside it.
6. ft_compile: the fine-tuning steps again with torch.compile (minutes of compilation).
7. scaling : OUT/scaling.md: per-GPU and per-node images/s, CPU cores per node, wall
             time of one ImageNet-1k fine-tuning epoch on 8 GPUs; targets met or not.

    bash tools/run_gpu_benchmarks.sh                        # the prepared run (~10 min on an H100)
    python -m benchmarks.bench_gpu --budget-s 560 --out /tmp/gpu
    python -m benchmarks.bench_gpu --rehearse --out /tmp/r   # tiny sizes on the CPU, same code paths

Imports only torch, torchvision, timm, numpy, PIL, accelerate and cssr_dist modules that
work without webdataset / wandb (the GPU image has neither). Without a CUDA device (and
without --rehearse) it exits with status 2 and one line saying so.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
import torch

from benchmarks.bench_train_step import (MODELS, VARIANTS, ModelSpec, build_trainer, error_text, make_batches,
                                         markdown, measure_or_error, run_steps)

NO_CUDA_EXIT = 2
NO_CUDA_MESSAGE = ("bench_gpu: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU "
                   "machine: bash tools/run_gpu_benchmarks.sh (or --rehearse to check the code here)")
NODE_GPUS = 8
IMAGENET_TRAIN = 1_281_167
WRN_BASELINE = 7108.7  # img/s, WRN-40-4 fp32 eager, H100, docs/benchmarks/gpu/h100_run1.md
DECODE_CORES = 4  # CPU cores per GPU the decode measurement may use (issue 12 target 4)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FT_MODELS = {"resnet50": ("resnet50_linear", "resnet50_pcssr", "resnet50_ft"),
             "vitb16": ("vitb16_linear", "vitb16_pcssr", "vitb16_rcssr")}

# ------------------------------------------------------------------ timing

class Timer:
    """Wall time of a block of device work: CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self.t0


def where(err: BaseException, limit: int = 4) -> list[str]:
    """The innermost frames of an exception outside torch's internals: where the sync happened."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename]
    return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-limit:]]


# ------------------------------------------------------------------ 2. host syncs


class SyncGuard:
    """Yields batches with `set_sync_debug_mode("error")` on while each step runs; turns it
    off when the batches run out, i.e. before the epoch-end loss reduction (a legitimate read)."""

    def __init__(self, batches, enabled: bool):
        self.batches, self.enabled = batches, enabled

    def _mode(self, mode) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode(mode)

    def __iter__(self):
        try:
            for batch in self.batches:
                self._mode("error")
                yield batch
        finally:
            self._mode(0)


def guard_control(device: torch.device) -> dict:
    """The guard must fire on a known sync, else a pass below would mean nothing."""
    if device.type != "cuda":
        return dict(kind="sync_control", skipped="no CUDA: set_sync_debug_mode is CUDA-only")
    x = torch.ones(2, device=device)
    try:
        torch.cuda.set_sync_debug_mode("error")
        x.sum().item()
        fired = False
    except RuntimeError:
        fired = True
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return dict(kind="sync_control", guard_fires_on_item=fired)


def sync_check(model: str, spec: ModelSpec, variant: str, device: torch.device, steps: int = 4,
               warmup: int = 2) -> dict:
    """Run `steps` training steps under the sync guard; report the first sync and where."""
    row = dict(kind="sync_check", model=model, variant=variant, batch=spec.batch, classes=spec.classes, steps=steps)
    trainer, info = build_trainer(spec, VARIANTS[variant], device, steps + warmup)
    row["optimizer_fused"] = info.get("optimizer_fused")
    batches = make_batches(spec, device, max(steps, warmup))
    run_steps(trainer, batches[:warmup], device)  # lazy initialisation outside the guard
    try:
        run_steps(trainer, SyncGuard(batches[:steps], enabled=device.type == "cuda"), device)
        row.update(ok=True, guarded=device.type == "cuda")
    except RuntimeError as err:
        row.update(ok=False, error=error_text(err), where=where(err))
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    return row


# ------------------------------------------------------------------ 1. the head (benchmarks/bench_head.py)


def head_rows(out: Path | None, rehearse: bool, timeout_s: float) -> list[dict]:
    """bench_head.py with the fused kernel; if that option is refused, again without it."""
    jsonl = (out or Path("/tmp")) / "head.jsonl"
    if rehearse:
        base = ["--device", "cpu", "--dtype", "fp32", "--repeats", "1", "--timeout-s", "120"]
        configs = ["12x40:chunked,{fused}loop@3"]
    else:
        base = ["--device", "cuda", "--dtype", "bf16", "--latent", "16", "--batch", "64", "--size", "7",
                "--repeats", "10", "--timeout-s", "60"]
        configs = ["1000x2048:chunked,{fused}loop", "1000x512:chunked,{fused}loop"]
    rows: list[dict] = []
    for fused in ("fused,", ""):
        cmd = [sys.executable, "-m", "benchmarks.bench_head", *base, "--jsonl", str(jsonl),
               "--configs", *[c.format(fused=fused) for c in configs]]
        jsonl.unlink(missing_ok=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        except subprocess.TimeoutExpired:
            rows.append(dict(kind="error", section="head", error=f"bench_head timed out after {timeout_s:.0f} s"))
            continue
        lines = jsonl.read_text().splitlines() if jsonl.exists() else []
        rows += [dict(json.loads(line), source="bench_head") for line in lines if line.strip()]
        table = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("|"))
        rows.append(dict(kind="head_table", fused=bool(fused), returncode=proc.returncode, markdown=table,
                         stderr_tail=proc.stderr.strip().splitlines()[-1:] if proc.returncode else []))
        if proc.returncode != 2:  # 2 = argparse refused an option: retry without the fused kernel
            break
    return rows


# ------------------------------------------------------------------ 3./4./6. training steps


def step_job(name: str, spec: ModelSpec, variant: str, device: torch.device, steps: int, warmup: int) -> dict:
    if "fused" in variant and device.type != "cuda":
        return dict(kind="skipped", section="step", model=name, variant=variant,
                    reason="the fused L1 kernel is CUDA-only")
    row = measure_or_error(name, spec, variant, device, steps, warmup)
    row.update(head=spec.head, projection=spec.projection, backbone=spec.backbone)
    if device.type == "cuda":
        import torch._dynamo

        row.pop("step_times_s", None)  # host timestamps of asynchronous steps mean nothing

        torch._dynamo.reset()  # compiled graphs of this model would stay in memory
    return row


# ------------------------------------------------------------------ 5. decoding on the device

def make_jpegs(count: int, width: int = 500, height: int = 375, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (smooth colour field + noise, q90; every 4th portrait), as in bench_data."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(count):
        w, h = (height, width) if i % 4 == 3 else (width, height)
        coarse = Image.fromarray(rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    return blobs




def write_jpeg_shards(folder: Path, blobs: list[bytes], per_shard: int, classes: int = 10) -> str:
    """A shard set in the project's layout (keys %09d, .jpg, .cls; index + labels) written with
    the stdlib tarfile: the GPU image has no webdataset (apps/make_shards/writer.py uses its TarWriter)."""
    from cssr_dist.data.shards.index import (KEY_FORMAT, ShardIndex, ShardInfo, labels_name, shard_name,
                                             write_index, write_labels)

    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "bench"
    labels = np.arange(len(blobs)) % classes
    shards = []
    for number, start in enumerate(range(0, len(blobs), per_shard)):
        path = folder / shard_name(prefix, number)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sid in range(start, min(start + per_shard, len(blobs))):
                for ext, data in (("jpg", blobs[sid]), ("cls", str(int(labels[sid])).encode())):
                    info = tarfile.TarInfo(f"{KEY_FORMAT % sid}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(ShardInfo(path.name, min(per_shard, len(blobs) - start), path.stat().st_size))
    write_labels(prefix, labels)
    index = ShardIndex(dataset="bench", subset="train", classes=[f"c{c}" for c in range(classes)], shards=shards,
                       class_counts=np.bincount(labels, minlength=classes).tolist(), unknown_count=0,
                       total=len(blobs), image_encoding={"encoding": "jpeg", "quality": 90},
                       labels_file=labels_name(prefix), made_with={"seed": 0})
    write_index(prefix, index)
    return str(prefix)


def decode_rate(prefix: str, decode_on: str, workers: int, batch: int, batches: int, size: int,
                device: torch.device) -> dict:
    """Images/s of the training shard stream + (decode_on=device) the DeviceBatchStage, in this
    process; the caller pins it to DECODE_CORES cores. Ends with the batch on the device."""
    from cssr_dist.config import DataConfig
    from cssr_dist.data.device_augment import DeviceBatchStage
    from cssr_dist.data.readers.shards import ShardLoader, ShardSet, ShardStream
    from cssr_dist.data.transforms import build_train_transform

    torch.set_num_threads(1)
    cfg = DataConfig(format="shards", image_size=size, in_chans=3, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                     train_augment="imagenet")
    shard_set = ShardSet.open(prefix, "", "bench shards")
    plan = shard_set.plan("bench", np.ones(len(shard_set.labels), dtype=bool), np.arange(shard_set.index.num_classes))
    transform = build_train_transform(cfg) if decode_on == "cpu" else None
    stream = ShardStream(plan, transform, batch_size=batch, training=True, rank=0, world_size=1, num_workers=workers,
                         seed=0, shuffle_buffer=4 * batch, decode_on=decode_on)
    loader = ShardLoader(stream)
    stage = DeviceBatchStage(cfg, training=True, device=device) if decode_on == "device" else None

    def batches_of(count: int):
        done = 0
        while done < count:
            for item in loader:
                yield item
                done += 1
                if done == count:
                    return

    def consume(item) -> int:
        images, labels, ids = stage(item) if stage else (t.to(device, non_blocking=True) for t in item)
        return int(labels.shape[0])

    warm = max(2, workers + 1)
    for item in batches_of(warm):  # workers started, nvjpeg handles made, kernels loaded
        consume(item)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, images = time.perf_counter(), 0
    for item in batches_of(batches):
        images += consume(item)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    loader.close()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(kind="decode", decode_on=decode_on, workers=workers, cores=cores, batch=batch, size=size,
                images=images, seconds=round(seconds, 3), images_per_s=round(images / seconds, 1), device=str(device),
                corrupt=stage.corrupt if stage else 0)


def decode_job(prefix: str, decode_on: str, workers: int, batch: int, batches: int, size: int,
               device: torch.device, timeout_s: float) -> dict:
    """`decode_rate` in a child process pinned to the first DECODE_CORES cores (its loader
    workers inherit the affinity), so the figure is what 4 CPU cores per GPU deliver."""
    args = dict(prefix=prefix, decode_on=decode_on, workers=workers, batch=batch, batches=batches, size=size,
                device=str(device))
    cmd = [sys.executable, "-m", "benchmarks.bench_gpu", "--decode-worker", json.dumps(args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(kind="decode", decode_on=decode_on, workers=workers, error=f"timed out after {timeout_s:.0f} s")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr.strip().splitlines() or [f"rc={proc.returncode}"])[-1]
        return dict(kind="decode", decode_on=decode_on, workers=workers, error=tail[:300])
    return rows[-1]


def decode_worker(text: str) -> int:
    args = json.loads(text)
    if hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[:DECODE_CORES])
    device = torch.device(args.pop("device"))
    print(json.dumps(decode_rate(device=device, **args)), flush=True)
    return 0


# ------------------------------------------------------------------ 7. scaling


def _best(rows: list[dict], model: str, variants: tuple[str, ...] | None = None) -> dict | None:
    found = [r for r in rows if r.get("kind") == "train_step" and r.get("model") == model and "images_per_s" in r
             and (variants is None or r["variant"] in variants)]
    return max(found, key=lambda r: r["images_per_s"], default=None)


def scaling_markdown(rows: list[dict], device_name: str) -> str:
    """docs/benchmarks/scaling.md's arithmetic on this run's figures (every number measured here)."""
    decode = {(r["decode_on"], r["workers"]): r for r in rows if r.get("kind") == "decode" and "images_per_s" in r}
    gpu_decode = max((r for (on, _), r in decode.items() if on == "device"), key=lambda r: r["images_per_s"],
                     default=None)
    cpu_decode = decode.get(("cpu", 3)) or next((r for (on, _), r in decode.items() if on == "cpu"), None)
    per_core = cpu_decode["images_per_s"] / max(1, cpu_decode["workers"]) if cpu_decode else None
    lines = [f"# Scaling from the measured figures ({device_name})", "",
             f"Per GPU: the training step alone (data on the device). Node: {NODE_GPUS} GPUs. Epoch: "
             f"{IMAGENET_TRAIN:,} ImageNet-1k training images / ({NODE_GPUS} x per-GPU img/s).",
             "CPU decoding: cores = node img/s / (PIL decode + project ImageNet transform img/s per loader worker, "
             f"measured on this machine's CPU: {per_core:.0f} img/s)." if per_core else
             "CPU decoding: not measured in this run.",
             "GPU decoding: `decode_on: device` with <= 4 CPU cores per GPU (3 loader workers) "
             + (f"delivered {gpu_decode['images_per_s']:,.0f} img/s per GPU (decoding alone, GPU otherwise idle); "
                "`with GPU decode` = 1 / (1/step + 1/decode), the pessimistic sum of both on one GPU."
                if gpu_decode else "was not measured in this run."), "",
             "| model | head | variant (best) | img/s per GPU | peak GiB | node img/s | CPU cores per node "
             "(CPU decode) | epoch min (step only) | with GPU decode: img/s per GPU | epoch min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for family, names in FT_MODELS.items():
        for name in names:
            best = _best(rows, name)
            if best is None:
                continue
            rate = best["images_per_s"]
            node = NODE_GPUS * rate
            cores = f"{node / per_core:.0f}" if per_core else ""
            combined = 1 / (1 / rate + 1 / gpu_decode["images_per_s"]) if gpu_decode else None
            lines.append(f"| {family} | {best['head']} | {best['variant']} | {rate:,.0f} | {best.get('peak_mem_gib', '')} "
                         f"| {node:,.0f} | {cores} | {IMAGENET_TRAIN / node / 60:.1f} | "
                         f"{'' if combined is None else f'{combined:,.0f}'} | "
                         f"{'' if combined is None else f'{IMAGENET_TRAIN / (NODE_GPUS * combined) / 60:.1f}'} |")
    lines += ["", "## Targets (issue 12)", ""]
    for family in FT_MODELS:
        linear, rcssr = (_best(rows, n) for n in (FT_MODELS[family][0], FT_MODELS[family][2]))
        if linear and rcssr:
            ratio = rcssr["images_per_s"] / linear["images_per_s"]
            lines.append(f"* target 2 ({family}): RCSSR {rcssr['images_per_s']:,.0f} ({rcssr['variant']}) / linear "
                         f"{linear['images_per_s']:,.0f} ({linear['variant']}) = {ratio:.2f}x (>= 0.6x: "
                         f"{'met' if ratio >= 0.6 else 'NOT met'})")
    wrn = _best(rows, "wrn40_4")
    if wrn:
        ratio = wrn["images_per_s"] / WRN_BASELINE
        lines.append(f"* target 3: WRN-40-4 best {wrn['images_per_s']:,.0f} img/s ({wrn['variant']}) = {ratio:.2f}x "
                     f"the {WRN_BASELINE:,.0f} of h100_run1 (>= 2x: {'met' if ratio >= 2 else 'NOT met'})")
    rcssr = _best(rows, "resnet50_ft")
    if gpu_decode and rcssr:
        ok = gpu_decode["images_per_s"] >= rcssr["images_per_s"]
        lines.append(f"* target 4: GPU decode {gpu_decode['images_per_s']:,.0f} img/s per GPU with "
                     f"{gpu_decode['cores']} CPU cores vs the ResNet-50 + RCSSR step {rcssr['images_per_s']:,.0f} "
                     f"({'met' if ok else 'NOT met'})")
    return "\n".join(lines) + "\n"


def summary_markdown(rows: list[dict]) -> str:
    parts = ["## training steps", markdown(rows), ""]
    parts += ["", "## head alone (benchmarks/bench_head.py)"]
    parts += [r["markdown"] for r in rows if r.get("kind") == "head_table"]
    parts += ["", "## decoding (ShardLoader -> device, <= 4 CPU cores)",
              "| decode_on | workers | cores | batch | px | images/s | note |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r.get("kind") == "decode"):
        parts.append(f"| {r['decode_on']} | {r['workers']} | {r.get('cores', '')} | {r.get('batch', '')} | "
                     f"{r.get('size', '')} | {r.get('images_per_s', '')} | {r.get('error', '')} |")
    parts += ["", "## other", *("    " + json.dumps(r) for r in rows
                                 if r.get("kind") in ("sync_control", "sync_check", "skipped", "error"))]
    return "\n".join(parts)


# ------------------------------------------------------------------ driver


def plan(args: argparse.Namespace, device: torch.device) -> list[tuple[str, float, Callable[[], list[dict] | dict]]]:
    """(section, estimated seconds on an H100, job) in run order. `--rehearse` shrinks every
    size (K=20, batch 1-4, tiny JPEGs) and compiles only a small model: it checks the code
    paths in a few minutes on a CPU, its numbers mean nothing."""
    rh = args.rehearse
    steps, warmup = (2, 1) if rh else (args.steps, args.warmup)
    wrn_steps = 2 if rh else 3 * args.steps
    ft = {n: replace(MODELS[n], batch=1, classes=20) if rh else MODELS[n] for names in FT_MODELS.values()
          for n in names}
    wrn = replace(MODELS["wrn40_4"], batch=2 if rh else 128)
    # the compile jobs of the rehearsal use the small osr_cnn: compiling a ResNet-50 on 2 CPU cores takes minutes
    small = replace(MODELS["osr_cnn"], batch=4)
    jobs: list[tuple[str, float, Callable]] = []
    if "head" in args.sections:
        jobs.append(("head", 100, lambda: head_rows(args.out, rh, 300 if rh else 110)))
    if "sync" in args.sections:
        jobs += [("sync", 3, lambda: guard_control(device)),
                 ("sync", 6, lambda: sync_check("resnet50_ft", ft["resnet50_ft"], "bf16", device))]
    if "ft" in args.sections:
        for family, names in FT_MODELS.items():
            for name in names:
                variants = ("bf16",) if name.endswith("linear") else ("bf16", "bf16_fused")
                for variant in variants:
                    jobs.append(("ft", 7, lambda n=name, v=variant: step_job(n, ft[n], v, device, steps, warmup)))
    if "wrn" in args.sections:
        for variant in ("fp32", "bf16"):
            jobs.append(("wrn", 4, lambda v=variant: step_job("wrn40_4", wrn, v, device, wrn_steps, warmup)))
        for variant in ("bf16_compile_ro", "compile_ro", "bf16_compile", "compile"):
            name, spec = ("osr_cnn", small) if rh else ("wrn40_4", wrn)
            jobs.append(("wrn", 40, lambda v=variant, n=name, s=spec: step_job(n, s, v, device, wrn_steps,
                                                                               warmup if rh else 5)))
    if "decode" in args.sections:
        jobs.append(("decode", 40, lambda: decode_section(args, device)))
    if "ft_compile" in args.sections and not rh:
        order = [("resnet50_linear", "bf16_compile"), ("resnet50_ft", "bf16_compile"),
                 ("resnet50_ft", "bf16_compile_fused"), ("vitb16_linear", "bf16_compile"),
                 ("vitb16_rcssr", "bf16_compile"), ("resnet50_pcssr", "bf16_compile"),
                 ("vitb16_rcssr", "bf16_compile_fused"), ("vitb16_pcssr", "bf16_compile")]
        for name, variant in order:
            jobs.append(("ft_compile", 55, lambda n=name, v=variant: step_job(n, ft[n], v, device, steps, warmup)))
    return jobs


def decode_section(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rh = args.rehearse
    count, per_shard, size = (24, 4, 64) if rh else (1536, 128, 224)
    width, height = (160, 120) if rh else (500, 375)
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"cssr_bench_shards_{os.getpid()}"
    t0 = time.perf_counter()
    prefix = write_jpeg_shards(folder, make_jpegs(count, width, height), per_shard)
    made = dict(kind="decode_shards", images=count, width=width, height=height, shards=-(-count // per_shard),
                seconds=round(time.perf_counter() - t0, 1))
    batch, batches = (4, 6) if rh else (64, 48)
    rows: list[dict] = [made]
    for decode_on, workers in (("device", 3), ("cpu", 3), ("device", 1)):
        rows.append(decode_job(prefix, decode_on, workers, batch, batches if decode_on == "device" else batches // 4,
                               size, device, timeout_s=120 if rh else 60))
    return rows


def header(device: torch.device) -> dict:
    import platform

    import timm
    import torchvision

    row = dict(kind="header", host=platform.node(), python=platform.python_version(), torch=torch.__version__,
               torchvision=torchvision.__version__, timm=timm.__version__, cpus=os.cpu_count(), device=str(device),
               date=time.strftime("%Y-%m-%d %H:%M:%S"), weights="random init (no network on the GPU machine)")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        row.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)
    try:
        import triton

        row["triton"] = triton.__version__
    except ImportError:
        row["triton"] = None
    return row


SECTIONS = ("head", "sync", "ft", "wrn", "decode", "ft_compile")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=560, help="skip jobs that would not finish within this")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per measurement (WRN: 3x)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps (include compilation)")
    p.add_argument("--out", type=Path, default=os.environ.get("OUT") or None, help="folder for jsonl + md ($OUT)")
    p.add_argument("--rehearse", "--cpu-dry-run", dest="rehearse", action="store_true",
                   help="tiny sizes on the CPU: exercise every code path in a few minutes, no numbers")
    p.add_argument("--decode-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.decode_worker:
        return decode_worker(args.decode_worker)
    if not args.rehearse and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return NO_CUDA_EXIT
    device = torch.device("cpu" if args.rehearse else "cuda")
    if args.rehearse:
        torch.set_num_threads(1)
    sink = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        sink = (args.out / "gpu_bench.jsonl").open("a")
    rows = [header(device)]
    device_name = rows[0].get("gpu") or "CPU rehearsal: numbers mean nothing"

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if sink:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    def write_summary() -> str:
        """Rewritten after every job: a run killed by its time limit still leaves both files.
        A bug in the summary must not stop the measurements: it becomes an error line."""
        try:
            text = summary_markdown(rows)
            if args.out:
                (args.out / "gpu_bench.md").write_text(f"# GPU run: {device_name}\n\n" + text + "\n")
                (args.out / "scaling.md").write_text(scaling_markdown(rows, device_name))
            return text
        except Exception as err:  # noqa: BLE001
            rows.append(dict(kind="error", section="summary", error=error_text(err), where=where(err)))
            emit(rows[-1])
            return ""

    emit(rows[0])
    start = time.perf_counter()
    for section, estimate, job in plan(args, device):
        elapsed = time.perf_counter() - start
        if not args.rehearse and elapsed + estimate > args.budget_s:
            rows.append(dict(kind="skipped", section=section, reason=f"budget: {elapsed:.0f} s used of "
                             f"{args.budget_s:.0f} s, job needs ~{estimate:.0f} s"))
            emit(rows[-1])
            continue
        try:
            result = job()
        except Exception as err:  # noqa: BLE001 - one broken job must not lose the others
            result = dict(kind="error", section=section, error=error_text(err), where=where(err))
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for row in result if isinstance(result, list) else [result]:
            row["section_elapsed_s"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            emit(row)
        write_summary()
    print(write_summary())
    print(scaling_markdown(rows, device_name))
    failed = [r for r in rows if "error" in r or r.get("ok") is False or r.get("guard_fires_on_item") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
