"""Benchmark: images/s of one full training step through the project's own Trainer.

A step is what `cssr_dist.engine.trainer.Trainer._step` does in a real run: forward
(backbone + RCSSR head) under the Accelerator's autocast, softmax_avg loss, backward, SGD
step (fused on CUDA, see engine/optim.py), LR scheduler step. It is driven through
`Trainer.train_epoch`, so the loss accumulation on the device and the epoch-end reduction
are included exactly as in training (logging is disabled: `tracking.log_every` > steps).

Variants (same process, one model built per variant):

* fp32            : eager, float32 (`run.mixed_precision: no`)
* bf16            : `Accelerator(mixed_precision="bf16")` autocast
* channels_last   : `model.channels_last: true` (the model is converted, as the runner does)
* compile         : `model.compile: true`; torch.compile (inductor). If compiling fails the
                    step runs eagerly and the row says `fallback` with the reason
* loop            : the reference implementation's head structure (a Python loop over
                    classes, `reference_cssr_logits`) with the SAME weights, instead of ours
* bf16_channels_last, bf16_compile, bf16_loop: combinations

    python -m benchmarks.bench_train_step --quick          # CI smoke, a few seconds
    python -m benchmarks.bench_train_step --repeats 2      # the CPU table of docs/benchmarks/train_step.md
    python -m benchmarks.bench_train_step --device cuda --models wrn40_4:128 --variants fp32 bf16 bf16_compile loop

Models are NAME[:batch]; NAME one of MODELS below. One JSON line per measurement goes to
stdout, then a markdown table. On CPU the rate uses the median per-step wall time (robust
to other jobs on a shared machine); on CUDA the total time of the timed steps between two
`torch.cuda.synchronize()` calls (per-step host timestamps mean nothing asynchronously).

Imports only torch, timm, accelerate and cssr_dist modules that do not import
webdataset / wandb, so benchmarks/bench_gpu.py can reuse it on a bare GPU image.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from cssr_dist.config import Config, ModelConfig
from cssr_dist.engine.checkpoint import TrainerState
from cssr_dist.engine.optim import build_optimizer
from cssr_dist.engine.preemption import PreemptionFlag
from cssr_dist.engine.schedule import build_scheduler
from cssr_dist.engine.trainer import Trainer
from cssr_dist.models.cssr_head import CSSRHead, reference_cssr_logits
from cssr_dist.models.losses import build_loss
from cssr_dist.models.osr_model import build_model


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: backbone + RCSSR head, input size and default batch."""

    backbone: str
    in_chans: int
    size: int
    batch: int
    classes: int
    latent: int
    freeze_backbone: bool = False
    head: str = "rcssr"  # linear | pcssr | rcssr
    projection: int | None = None


@dataclass(frozen=True)
class Variant:
    precision: str = "no"  # Accelerator mixed_precision
    channels_last: bool = False
    compile: bool = False
    head: str = "ours"  # ours | loop
    compile_mode: str = "default"  # model.compile_mode (reduce-overhead: CUDA graphs)
    l1_kernel: str = "chunked"  # model.l1_kernel: chunked | triton (the fused kernel)


MODELS = {
    # the default experiment (Fashion-MNIST, 6 known classes)
    "osr_cnn": ModelSpec("osr_cnn", 1, 28, 128, 6, 64),
    # CIFAR from scratch; batch 128 in the paper, 32 on the CPU to keep a step a few seconds
    "wrn40_4": ModelSpec("wrn40_4", 3, 32, 32, 6, 64),
    # ImageNet fine-tuning: frozen ResNet-50 (eval mode, no_grad), RCSSR head K=1000, latent 16
    "resnet50_ft": ModelSpec("resnet50", 3, 224, 64, 1000, 16, freeze_backbone=True),
    # the same frozen backbone with the other heads: linear, and PCSSR as the reference ran it
    # (projection 512, latent 32); ViT-B/16's 14x14 patch-token map with the same three heads.
    # Random weights: the cost of a step does not depend on them (GPU machines have no network)
    "resnet50_linear": ModelSpec("resnet50", 3, 224, 64, 1000, 16, freeze_backbone=True, head="linear"),
    "resnet50_pcssr": ModelSpec("resnet50", 3, 224, 64, 1000, 32, freeze_backbone=True, head="pcssr",
                                projection=512),
    "vitb16_linear": ModelSpec("vit_base_patch16_224", 3, 224, 64, 1000, 16, freeze_backbone=True, head="linear"),
    "vitb16_rcssr": ModelSpec("vit_base_patch16_224", 3, 224, 64, 1000, 16, freeze_backbone=True),
    "vitb16_pcssr": ModelSpec("vit_base_patch16_224", 3, 224, 64, 1000, 32, freeze_backbone=True, head="pcssr",
                              projection=512),
}
VARIANTS = {
    "fp32": Variant(),
    "bf16": Variant(precision="bf16"),
    "channels_last": Variant(channels_last=True),
    "bf16_channels_last": Variant(precision="bf16", channels_last=True),
    "compile": Variant(compile=True),
    "bf16_compile": Variant(precision="bf16", compile=True),
    "loop": Variant(head="loop"),
    "bf16_loop": Variant(precision="bf16", head="loop"),
    "bf16_fused": Variant(precision="bf16", l1_kernel="triton"),
    "bf16_compile_fused": Variant(precision="bf16", compile=True, l1_kernel="triton"),
    "compile_ro": Variant(compile=True, compile_mode="reduce-overhead"),
    "bf16_compile_ro": Variant(precision="bf16", compile=True, compile_mode="reduce-overhead"),
}
CPU_DEFAULT_MODELS = ("osr_cnn", "wrn40_4")
CPU_DEFAULT_VARIANTS = ("fp32", "bf16", "channels_last", "bf16_channels_last", "compile", "bf16_compile", "loop")
QUICK_MODELS = ("osr_cnn:16",)
QUICK_VARIANTS = ("fp32", "bf16", "channels_last", "loop")


class LoopHead(nn.Module):
    """The reference's per-class loop evaluated on a CSSRHead's own weights (same maths, old structure)."""

    def __init__(self, head: CSSRHead):
        super().__init__()
        self.inner = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.inner
        features = head.projection(x)
        logits = reference_cssr_logits(features, list(head.encoders), list(head.decoders),
                                       sign=1 if head.scale >= 0 else -1, gamma=abs(head.scale),
                                       distance=head.distance, clamp=head.clamp)
        return features, logits


def parse_model(text: str) -> tuple[str, ModelSpec]:
    name, _, batch = text.partition(":")
    if name not in MODELS:
        raise SystemExit(f"error: unknown model {name!r}; use one of {', '.join(MODELS)}")
    spec = MODELS[name]
    return name, replace(spec, batch=int(batch)) if batch else spec


def new_accelerator(device: torch.device, precision: str):
    """A fresh Accelerator per variant: its state is a process-wide singleton whose
    mixed_precision cannot change once set, so it is reset first (private API, bench only)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is not None:
        reset(True)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision)


def bench_config(spec: ModelSpec, variant: Variant, log_every: int) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(backbone=spec.backbone, head=spec.head, latent_dim=spec.latent,
                            projection_dim=spec.projection, freeze_backbone=spec.freeze_backbone,
                            channels_last=variant.channels_last, compile=variant.compile,
                            compile_mode=variant.compile_mode, l1_kernel=variant.l1_kernel)
    cfg.run.mixed_precision = variant.precision
    cfg.tracking.wandb = False
    cfg.tracking.log_every = log_every
    cfg.optim.lr = 0.01  # random data: keep the weights finite, the cost is the same
    return cfg


def build_trainer(spec: ModelSpec, variant: Variant, device: torch.device, steps: int,
                  log_every: int = 10**9) -> tuple[Trainer, dict]:
    """Model, optimizer, scheduler and Trainer assembled as engine/runner.py does (no data)."""
    cfg = bench_config(spec, variant, log_every)
    acc = new_accelerator(device, variant.precision)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec.classes, spec.in_chans).to(acc.device)
    if variant.head == "loop":
        model.head = LoopHead(model.head)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    info = {"compiled": False}
    if variant.compile:
        model, info = try_compile(model, variant.compile_mode)
    optimizer = build_optimizer(model.parameters(), cfg.optim, spec.batch)
    info["optimizer_fused"] = bool(optimizer.defaults.get("fused"))
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, cfg.schedule, max(1, steps))
    trainer = Trainer(cfg, acc, model, optimizer, scheduler, build_loss(spec.head), TrainerState(),
                      PreemptionFlag(signals=()), lambda: None)  # no signal handlers: `timeout` must kill us
    return trainer, info


def try_compile(model: nn.Module, mode: str = "default") -> tuple[nn.Module, dict]:
    """torch.compile without suppressing errors, so that a fallback is SEEN (the runner's
    `compile_or_eager` falls back silently); the first step then decides (see `run_steps`)."""
    try:
        import torch._dynamo

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        return torch.compile(model, mode=mode), {"compiled": True, "compile_mode": mode, "eager_model": model}
    except Exception as err:  # noqa: BLE001 - any backend failure: report and run eagerly
        return model, {"compiled": False, "fallback": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}


def compile_counters() -> dict:
    """How much dynamo captured: graphs compiled and graph breaks (0 = one whole graph each way)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "break_reasons": [reason.splitlines()[0][:160] for reason in list(counters["graph_break"])[:4]],
            # reduce-overhead: graphs that did NOT become CUDA graphs (e.g. a CPU tensor, mutated input)
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


def make_batches(spec: ModelSpec, device: torch.device, count: int) -> list[tuple[torch.Tensor, ...]]:
    """`count` references to one random batch already on the device (no loader cost)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(spec.batch, spec.in_chans, spec.size, spec.size, generator=g).to(device)
    labels = torch.randint(0, spec.classes, (spec.batch,), generator=g).to(device)
    ids = torch.arange(spec.batch).to(device)
    return [(images, labels, ids)] * count


class Timestamps:
    """Iterates batches and records the host time at each request (= end of the previous step)."""

    def __init__(self, batches):
        self.batches, self.marks = batches, []

    def __iter__(self):
        for batch in self.batches:
            self.marks.append(time.perf_counter())
            yield batch
        self.marks.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.marks[:-1], self.marks[1:])]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_steps(trainer: Trainer, batches, device: torch.device) -> tuple[float, list[float], float]:
    """One `train_epoch` over `batches`: (total seconds, per-step host seconds, mean loss)."""
    trainer.state.step_in_epoch = 0
    stamps = Timestamps(batches)
    _sync(device)
    t0 = time.perf_counter()
    result = trainer.train_epoch(stamps)
    _sync(device)
    return time.perf_counter() - t0, stamps.step_times(), result.mean_loss


def measure(name: str, spec: ModelSpec, variant_name: str, device: torch.device, steps: int, warmup: int) -> dict:
    """images/s of the full training step for one (model, variant)."""
    variant = VARIANTS[variant_name]
    row = dict(kind="train_step", model=name, backbone=spec.backbone, variant=variant_name, device=str(device),
               batch=spec.batch, size=spec.size, classes=spec.classes, latent=spec.latent,
               frozen_backbone=spec.freeze_backbone, threads=torch.get_num_threads(), steps=steps, warmup=warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer, info = build_trainer(spec, variant, device, steps + warmup)
    eager = info.pop("eager_model", None)
    batches = make_batches(spec, device, max(steps, warmup, 1))
    t0 = time.perf_counter()
    try:
        run_steps(trainer, batches[:max(1, warmup)], device)
    except Exception as err:  # noqa: BLE001 - compile failed at the first call: fall back, as the runner does
        if eager is None:
            raise
        info.update(compiled=False, fallback=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
        trainer.model = eager
        run_steps(trainer, batches[:max(1, warmup)], device)
    row["warmup_s"] = round(time.perf_counter() - t0, 3)
    if info.get("compiled"):
        info.update(compile_counters())
    total, step_times, loss = run_steps(trainer, batches[:steps], device)
    per_step = statistics.median(step_times) if device.type == "cpu" else total / steps
    row.update(info, step_times_s=[round(t, 4) for t in step_times], total_s=round(total, 4),
               step_s=round(per_step, 4), images_per_s=round(spec.batch / per_step, 2),
               loss_finite=math.isfinite(loss))
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def error_text(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_or_error(name: str, spec: ModelSpec, variant: str, device: torch.device, steps: int, warmup: int) -> dict:
    """`measure`, or a row with the error (e.g. out of memory) so that the next variant still runs."""
    try:
        return measure(name, spec, variant, device, steps, warmup)
    except Exception as err:  # noqa: BLE001 - report and go on
        return dict(kind="train_step", model=name, variant=variant, batch=spec.batch, size=spec.size,
                    error=error_text(err))
    finally:
        free_device_memory(device)


def markdown(rows: list[dict]) -> str:
    """One line per (model, variant): the best repeat (shared machines only ever slow a run down)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("kind") == "train_step":
            groups.setdefault((r["model"], r["variant"]), []).append(r)
    best = {key: max((r for r in group if "images_per_s" in r), key=lambda r: r["images_per_s"], default=None)
            for key, group in groups.items()}
    lines = ["| model | batch | px | variant | images/s | step s | vs fp32 | all repeats img/s | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (model, variant), group in groups.items():
        r = best[(model, variant)]
        if r is None:
            g = group[0]
            lines.append(f"| {model} | {g['batch']} | {g['size']} | {variant} | | | | | error: {g['error']} |")
            continue
        ref = best.get((model, "fp32"))
        ratio = f"{r['images_per_s'] / ref['images_per_s']:.2f}x" if ref else ""
        note = []
        if r.get("fallback"):
            note.append(f"compile FELL BACK to eager ({r['fallback']})")
        elif r.get("compiled"):
            mode = r.get("compile_mode", "default")
            note.append(f"inductor {mode} ({r.get('graphs')} graphs, {r.get('graph_breaks')} breaks"
                        + (f", {r['cudagraph_skips']} cudagraph skips" if r.get("cudagraph_skips") else "")
                        + f"), warm-up incl. compile {r['warmup_s']:.0f} s")
        if r.get("optimizer_fused"):
            note.append("fused SGD")
        if not r["loss_finite"]:
            note.append("loss not finite")
        if "peak_mem_gib" in r:
            note.append(f"peak {r['peak_mem_gib']} GiB")
        errors = [g["error"] for g in group if "error" in g]
        if errors:
            note.append(f"{len(errors)} repeat(s) failed: {errors[0]}")
        repeats = ", ".join(f"{g['images_per_s']:.1f}" for g in group if "images_per_s" in g)
        lines.append(f"| {model} | {r['batch']} | {r['size']} | {variant} | {r['images_per_s']:.1f} | "
                     f"{r['step_s']:.3f} | {ratio} | {repeats} | {'; '.join(note)} |")
    return "\n".join(lines)


def header(device: torch.device) -> dict:
    return dict(kind="header", host=platform.node(), cpu=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, python=platform.python_version(), device=str(device),
                cuda=torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))


def emit(row: dict, sink=None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if sink is not None:
        sink.write(line + "\n")
        sink.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI smoke: osr_cnn batch 16, 2 steps, no compile")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", help=f"NAME[:batch], NAME in {', '.join(MODELS)}")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), help="default: the CPU table")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2, quick 1)")
    p.add_argument("--repeats", type=int, default=1,
                   help="interleaved passes over all measurements; the table keeps the best")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: a shared 2-core box stalls OpenMP teams; 0 = torch default)")
    p.add_argument("--json", type=Path, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_train_step: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    models = args.models or (QUICK_MODELS if args.quick else CPU_DEFAULT_MODELS)
    variants = args.variants or (QUICK_VARIANTS if args.quick else CPU_DEFAULT_VARIANTS)
    steps = args.steps or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    sink = args.json.open("a") if args.json else None
    rows = [header(device)]
    emit(rows[0], sink)
    for repeat in range(args.repeats):
        for text in models:
            name, spec = parse_model(text)
            for variant in variants:
                row = measure_or_error(name, spec, variant, device, steps, warmup)
                row["repeat"] = repeat
                rows.append(row)
                emit(row, sink)
    print(markdown(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
