"""GPU benchmarks for a lent H100/H200: training step, CSSR head, host syncs, JPEG decoding.

Prints ONE JSON line per measurement (and appends them to OUT/gpu_bench.jsonl), then a
markdown summary (OUT/gpu_bench.md). Sections, in the order they run (cheap and most
informative first, so a time budget cuts the expensive ones):

1. sync     : `torch.cuda.set_sync_debug_mode("error")` around the steps of the project's
              `Trainer.train_epoch` (logging off), after an unguarded warm-up; a control
              (`.item()` under the guard) proves the guard fires.
2. head     : CSSR head alone, K=1000, C=512 / 2048, batch 64, 7x7, latent 16, forward +
              backward, fp32 / bf16: ours (chunked L1), L2 closed form, and the reference
              per-class loop. Target: ours >= 10x faster than the loop.
3. train    : full training step images/s (tools/bench_train_step.py's `measure`): WRN-40-4
              at 32 px batch 128 from scratch, and a frozen timm ResNet-50 (random weights;
              eval mode, no_grad) + RCSSR head (K=1000, latent 16) at 224 px, each in fp32,
              bf16, bf16 + channels_last and with the reference loop head.
4. jpeg     : decoding generated 500x375 JPEGs (q90): torchvision.io.decode_jpeg on the CPU
              (1 thread) and on the GPU (nvjpeg, batched), each alone and followed by
              RandomResizedCrop(224) + flip + normalise; PIL decode + the same transform on 1
              CPU thread (what a loader worker does; docs/benchmarks/data.md measured it on
              the dev box).
5. compile  : bf16 + torch.compile (inductor) of both training steps (minutes to compile).
6. summary  : images/s a node with 8 such GPUs needs from its data path, and the CPU cores
              that takes at the per-core decode rate just measured (formula in
              docs/benchmarks/scaling.md).

    PYTHONPATH=. bash tools/run_gpu_benchmarks.sh          # the prepared run (~8 min)
    PYTHONPATH=. python tools/bench_gpu.py --budget-s 480 --out /tmp/gpu
    PYTHONPATH=. python tools/bench_gpu.py --cpu-dry-run   # tiny sizes on the CPU: checks the code paths

Imports only torch, torchvision, timm, numpy, PIL (a torchvision dependency), accelerate
and cssr_dist modules that do not import webdataset / wandb (the GPU image has neither).
Without a CUDA device it exits with status 2 and one line saying so.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tools"):  # cssr_dist, and the sibling bench_train_step (tools/ is no package)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cssr_dist.models.cssr_head import CSSRHead  # noqa: E402
from cssr_dist.models.losses import softmax_avg_loss  # noqa: E402
from bench_train_step import (MODELS, VARIANTS, LoopHead, ModelSpec, build_trainer, error_text,  # noqa: E402
                                    free_device_memory, make_batches, markdown, measure_or_error, run_steps)

NO_CUDA_EXIT = 2
NO_CUDA_MESSAGE = ("bench_gpu: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU "
                   "machine: PYTHONPATH=. bash tools/run_gpu_benchmarks.sh (or --cpu-dry-run to check the code here)")
NODE_GPUS = 8
DEV_BOX_DECODE_PER_CORE = 379.0  # img/s, PIL decode + RRC224 + flip + normalise, docs/benchmarks/data.md

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


# ------------------------------------------------------------------ 1. host syncs


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


# ------------------------------------------------------------------ 2. the head alone


def head_step(impl: str, classes: int, channels: int, batch: int, dtype: str, device: torch.device,
              warmup: int, iters: int, size: int = 7, latent: int = 16, class_chunk: int | None = None) -> dict:
    """Forward + softmax_avg loss + backward of the CSSR head alone on a [batch, C, 7, 7] map.

    `class_chunk` None = the default byte budget (256 MiB per chunk on a GPU); small chunks
    keep the [chunk, C, N] residual in L2 between the elementwise passes, which matters
    because the chunked L1 distance is memory-bound on a GPU (docs/benchmarks/scaling.md)."""
    from cssr_dist.models.cssr_l1_function import default_class_chunk

    bf16 = dtype == "bf16"
    if impl == "chunked" and class_chunk is None:
        class_chunk = default_class_chunk(classes, channels, batch * size * size, 2 if bf16 else 4, device)
    row = dict(kind="head", impl=impl, classes=classes, channels=channels, batch=batch, size=size, latent=latent,
               dtype=dtype, chunk=class_chunk if impl == "chunked" else None)
    torch.manual_seed(0)
    head = CSSRHead(channels, classes, latent=latent, gamma=0.1, sign=1, distance="l2" if impl == "l2" else "l1",
                    class_chunk=class_chunk).to(device)
    module = LoopHead(head) if impl == "loop" else head
    x = torch.randn(batch, channels, size, size, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    x = x.abs_().requires_grad_()
    targets = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, logits = module(x)
        softmax_avg_loss(logits, targets).backward()
        x.grad = None
        head.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with Timer(device) as timer:
        for _ in range(iters):
            step()
    row.update(iters=iters, step_ms=round(1000 * timer.seconds / iters, 3))
    if device.type == "cuda":
        row["peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    return row


def head_or_error(impl: str, classes: int, channels: int, batch: int, dtype: str, device: torch.device,
                  warmup: int, iters: int, class_chunk: int | None = None) -> dict:
    try:
        return head_step(impl, classes, channels, batch, dtype, device, warmup, iters, class_chunk=class_chunk)
    except Exception as err:  # noqa: BLE001 - e.g. the loop running out of memory: report, go on
        return dict(kind="head", impl=impl, classes=classes, channels=channels, batch=batch, dtype=dtype,
                    error=error_text(err))
    finally:
        free_device_memory(device)


def head_speedups(rows: list[dict]) -> list[dict]:
    """ours (default chunk) / l2 vs the loop at the same (K, C, batch, dtype); target >= 10x."""
    out = []
    loops = {(r["classes"], r["channels"], r["batch"], r["dtype"]): r for r in rows
             if r.get("kind") == "head" and r["impl"] == "loop" and "step_ms" in r}
    for r in rows:
        if r.get("kind") != "head" or r["impl"] == "loop" or "step_ms" not in r or r.get("sweep"):
            continue
        ref = loops.get((r["classes"], r["channels"], r["batch"], r["dtype"]))
        if ref:
            speedup = ref["step_ms"] / r["step_ms"]
            out.append(dict(kind="head_speedup", impl=r["impl"], classes=r["classes"], channels=r["channels"],
                            dtype=r["dtype"], speedup_vs_loop=round(speedup, 2), target=10.0,
                            met=speedup >= 10.0))
    return out


# ------------------------------------------------------------------ 4. JPEG decoding

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def _one_thread(fn: Callable[[], None]) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def cifar_transform_row(count: int) -> dict:
    """The CIFAR training transform of the paper's recipe (flip, crop, CSSR RandAugment n=2
    m=10, normalise, manual contrast) on 32x32 RGB images, 1 CPU thread: the per-core data
    rate for the from-scratch runs (their images sit decoded in memory)."""
    from PIL import Image

    from cssr_dist.config import DataConfig
    from cssr_dist.data.transforms import build_train_transform  # lazily: cssr_dist.data pulls in the loaders

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]
    transform = build_train_transform(DataConfig(image_size=32, in_chans=3, train_augment="cssr",
                                                 mean=[0.5] * 3, std=[0.25] * 3))
    seconds = _one_thread(lambda: [transform(img) for img in images])
    return dict(kind="transform", path="cpu_cifar_cssr_transform", threads=1, images=count, size=32,
                images_per_s=round(count / seconds, 1))


def jpeg_rows(device: torch.device, count: int, batch: int) -> list[dict]:
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    from cssr_dist.config import DataConfig
    from cssr_dist.data.transforms import build_train_transform  # lazily: cssr_dist.data pulls in the loaders

    blobs = make_jpegs(count)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    common = dict(images=count, width=500, height=375, mean_kb=round(sum(map(len, blobs)) / count / 1024, 1))
    rows = []

    pil_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def pil_all() -> None:
        for b in blobs:
            pil_tf(Image.open(io.BytesIO(b)).convert("RGB"))

    seconds = _one_thread(pil_all)
    rows.append(dict(kind="jpeg", path="cpu_pil_decode_transform", threads=1, images_per_s=round(count / seconds, 1),
                     **common))
    project_tf = build_train_transform(DataConfig(image_size=224, in_chans=3, train_augment="imagenet",
                                                  mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)))
    seconds = _one_thread(lambda: [project_tf(Image.open(io.BytesIO(b))) for b in blobs])
    rows.append(dict(kind="jpeg", path="cpu_pil_decode_project_imagenet_transform", threads=1,
                     images_per_s=round(count / seconds, 1), **common))
    seconds = _one_thread(lambda: decode_jpeg(data))
    rows.append(dict(kind="jpeg", path="cpu_tv_decode", threads=1, images_per_s=round(count / seconds, 1), **common))

    crop = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def device_decode(transform: bool) -> None:
        for i in range(0, count, batch):
            images = decode_jpeg(data[i:i + batch], device=device)
            if transform:
                out = torch.stack([crop(img.float().div_(255)) for img in images])
                out.sub_(mean).div_(std)

    for transform in (False, True):
        device_decode(transform)  # warm-up: nvjpeg handles, kernels
        with Timer(device) as timer:
            device_decode(transform)
        rows.append(dict(kind="jpeg", path=f"{device.type}_decode_batched" + ("_transform" if transform else ""),
                         batch=batch, images_per_s=round(count / timer.seconds, 1), device=str(device), **common))
    return rows


# ------------------------------------------------------------------ 6. summary


def scaling_rows(rows: list[dict]) -> list[dict]:
    """Per measured training step: what 8 GPUs need from the data path, and CPU cores for it."""
    decode = {r["path"]: r["images_per_s"] for r in rows if r.get("kind") in ("jpeg", "transform")}
    per_core_224 = decode.get("cpu_pil_decode_project_imagenet_transform") or decode.get("cpu_pil_decode_transform")
    per_core_32 = decode.get("cpu_cifar_cssr_transform")
    gpu_decode = decode.get("cuda_decode_batched_transform")
    out = []
    for r in rows:
        if r.get("kind") != "train_step" or "images_per_s" not in r or "loop" in r["variant"]:
            continue
        need = NODE_GPUS * r["images_per_s"]
        row = dict(kind="scaling", model=r["model"], variant=r["variant"], per_gpu_images_per_s=r["images_per_s"],
                   node_gpus=NODE_GPUS, node_images_per_s=round(need, 1))
        if r["size"] < 64:  # CIFAR-style: decoded arrays in memory, augmentation only
            if per_core_32:
                row.update(cpu_rate_per_core=per_core_32, cores_needed=round(need / per_core_32, 1))
        else:
            row["cores_at_dev_box_rate"] = round(need / DEV_BOX_DECODE_PER_CORE, 1)
            if per_core_224:
                row.update(cpu_rate_per_core=per_core_224, cores_needed=round(need / per_core_224, 1))
            if gpu_decode:  # fraction of one GPU's time that decoding its own images would take, roughly
                row["gpu_decode_share"] = round(r["images_per_s"] / gpu_decode, 3)
        out.append(row)
    return out


def summary_markdown(rows: list[dict]) -> str:
    parts = ["## training step", markdown(rows), "", "## head alone (fwd+bwd)",
             "| K | C | batch | dtype | impl | chunk | ms | peak extra GiB | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r.get("kind") == "head"):
        note = "chunk sweep" if r.get("sweep") else ""
        parts.append(f"| {r['classes']} | {r['channels']} | {r['batch']} | {r['dtype']} | {r['impl']} | "
                     f"{r.get('chunk') or ''} | {r.get('step_ms', '')} | {r.get('peak_extra_gib', '')} | "
                     f"{r.get('error', note)} |")
    for r in (r for r in rows if r.get("kind") == "head_speedup"):
        parts.append(f"\n{r['impl']} vs loop, K={r['classes']} C={r['channels']} {r['dtype']}: "
                     f"{r['speedup_vs_loop']}x (target >= 10x: {'met' if r['met'] else 'NOT met'})")
    parts += ["", "## other", *("    " + json.dumps(r) for r in rows
                                 if r.get("kind") in ("sync_control", "sync_check", "jpeg", "transform", "scaling",
                                                         "skipped", "error"))]
    return "\n".join(parts)


# ------------------------------------------------------------------ driver


def plan(args: argparse.Namespace, device: torch.device) -> list[tuple[str, float, Callable[[], list[dict] | dict]]]:
    """(section, estimated seconds, job) in run order; a job whose estimate does not fit the
    remaining budget is skipped with a JSON line saying so. `--cpu-dry-run` shrinks every
    size (K=20 for the fine-tune head, tiny batches) and drops compilation: it checks the
    code paths, its numbers mean nothing."""
    dry = args.cpu_dry_run
    steps, warmup = (2, 1) if dry else (args.steps, args.warmup)
    wrn = replace(MODELS["wrn40_4"], batch=2 if dry else args.wrn_batch)
    ft = replace(MODELS["resnet50_ft"], batch=1 if dry else args.ft_batch, classes=20 if dry else 1000)
    osr = replace(MODELS["osr_cnn"], batch=4 if dry else 128)
    head_k, head_batch, head_channels = (20, 2, (64,)) if dry else (1000, 64, (512, 2048))
    head_iters = (1, 1) if dry else (10, 3)  # ours, loop
    jobs: list[tuple[str, float, Callable]] = []
    if "sync" in args.sections:
        jobs.append(("sync", 5, lambda: guard_control(device)))
        for model, spec, variant in (("osr_cnn", osr, "fp32"), ("wrn40_4", wrn, "bf16"), ("resnet50_ft", ft, "bf16")):
            if not (dry and model == "wrn40_4"):
                jobs.append(("sync", 20, lambda m=model, s=spec, v=variant: sync_check(m, s, v, device)))
    if "head" in args.sections:
        for channels in head_channels:
            for dtype in ("fp32", "bf16"):
                for impl in ("chunked", "l2", "loop"):
                    iters = head_iters[1] if impl == "loop" else head_iters[0]
                    jobs.append(("head", 15 if impl == "loop" else 5,
                                 lambda i=impl, c=channels, d=dtype, n=iters:
                                 head_or_error(i, head_k, c, head_batch, d, device, 1, n)))
            for chunk in (1, 4, 16):  # chunk-size sweep, bf16 (is the residual L2-resident?)
                jobs.append(("head", 5, lambda c=channels, m=chunk: dict(
                    head_or_error("chunked", head_k, c, head_batch, "bf16", device, 1, head_iters[0], m), sweep=True)))
    if "train" in args.sections:
        variants = ("fp32", "bf16_loop") if dry else ("fp32", "bf16", "bf16_channels_last", "loop", "bf16_loop")
        for model, spec in (("wrn40_4", wrn), ("resnet50_ft", ft)):
            for variant in variants:
                jobs.append(("train", 25 if "loop" in variant else 15,
                             lambda m=model, s=spec, v=variant: measure_or_error(m, s, v, device, steps, warmup)))
    if "jpeg" in args.sections:
        jpegs = args.jpegs or (8 if dry else 256)
        jobs.append(("jpeg", 30, lambda: jpeg_rows(device, jpegs, 4 if dry else 64)))
        jobs.append(("jpeg", 10, lambda: cifar_transform_row(jpegs * 8)))
    if "compile" in args.sections and not dry:
        for model, spec in (("wrn40_4", wrn), ("resnet50_ft", ft)):
            jobs.append(("compile", 150,
                         lambda m=model, s=spec: measure_or_error(m, s, "bf16_compile", device, steps, warmup)))
    return jobs


def header(device: torch.device) -> dict:
    import platform

    import timm
    import torchvision

    row = dict(kind="header", host=platform.node(), python=platform.python_version(), torch=torch.__version__,
               torchvision=torchvision.__version__, timm=timm.__version__, cpus=os.cpu_count(), device=str(device),
               date=time.strftime("%Y-%m-%d %H:%M:%S"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        row.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=480, help="skip jobs that would not finish within this")
    p.add_argument("--sections", nargs="+", default=["sync", "head", "train", "jpeg", "compile"],
                   choices=("sync", "head", "train", "jpeg", "compile"))
    p.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps (include compilation)")
    p.add_argument("--wrn-batch", type=int, default=128)
    p.add_argument("--ft-batch", type=int, default=64,
                   help="ResNet-50 fine-tune batch (64: the loop head needs ~40 GB at K=1000 in fp32)")
    p.add_argument("--jpegs", type=int, default=None, help="JPEGs to decode (default 256; 8 in a dry run)")
    p.add_argument("--out", type=Path, default=os.environ.get("OUT") or None, help="folder for jsonl + md ($OUT)")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU: exercise the code, no numbers")
    args = p.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return NO_CUDA_EXIT
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    if args.cpu_dry_run:
        torch.set_num_threads(1)
    sink = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        sink = (args.out / "gpu_bench.jsonl").open("a")

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if sink:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    def derived(rows: list[dict]) -> list[dict]:
        return head_speedups(rows) + scaling_rows(rows)

    def write_summary(rows: list[dict]) -> str:
        """Rewritten after every job: a run killed by its time limit still leaves a summary."""
        text = summary_markdown(rows + derived(rows))
        if args.out:
            (args.out / "gpu_bench.md").write_text(text + "\n")
        return text

    rows = [header(device)]
    emit(rows[0])
    start = time.perf_counter()
    for section, estimate, job in plan(args, device):
        elapsed = time.perf_counter() - start
        if elapsed + estimate > args.budget_s:
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
        for row in result if isinstance(result, list) else [result]:
            row["section_elapsed_s"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            emit(row)
        write_summary(rows)
    for row in derived(rows):
        emit(row)
    print(write_summary(rows))
    rows += derived(rows)
    failed = [r for r in rows if "error" in r or r.get("ok") is False or r.get("guard_fires_on_item") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
