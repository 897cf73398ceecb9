"""Benchmark: CSSR head forward+backward, chunked custom autograd vs the per-class loop.

Compares, on one training step of the head alone (features -> logits -> softmax_avg loss
-> backward into the features and all head weights):

* chunked : `CSSRHead(distance='l1')`: batched encoders + `chunked_l1_distance`;
* loop    : the reference implementation's structure, a Python loop of per-class 1x1-conv
            auto-encoders (`reference_cssr_logits`), L1;
* l2      : `CSSRHead(distance='l2')`: the closed form (a different distance, shown beside).

Every configuration runs in its OWN subprocess so its peak memory is honest: on CPU the
process's resident-set high-water mark (VmHWM, reset after setup through
/proc/self/clear_refs; falls back to getrusage's ru_maxrss), minus the resident size
before the step; on CUDA `torch.cuda.max_memory_allocated` minus what was allocated before.
tracemalloc would not see torch's allocations.

    python tools/bench_head.py --quick                       # seconds, CI smoke
    python tools/bench_head.py                               # the CPU table of docs/benchmarks/head.md
    python tools/bench_head.py --device cuda --dtype bf16 --configs 1000x512:chunked,loop,l2 1000x2048:chunked,loop,l2

A config is KxC:impl[,impl...][@batch]; batch defaults to --batch, maps are --size^2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("chunked", "loop", "l2")

# The 2-core dev box (23 GB RAM, shared) cannot hold the loop at K=1000, B=64 (~20 GB), so
# the loop is compared at the largest K that fits; chunked and l2 also run at full scale.
CPU_DEFAULT_CONFIGS = (
    "250x512:chunked,loop,l2",
    "1000x512:chunked,l2",
    "60x2048:chunked,loop,l2",
    "1000x2048:chunked,l2",
)
QUICK_CONFIGS = ("20x64:chunked,loop,l2@8",)


def _rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict:
    """One configuration, in this process: time and peak memory of forward+backward."""
    import torch

    sys.path.insert(0, str(ROOT))
    from cssr_dist.models import CSSRHead, reference_cssr_logits, softmax_avg_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    head = CSSRHead(args.channels, args.classes, latent=args.latent, gamma=0.1, sign=1,
                    distance="l2" if args.impl == "l2" else "l1", class_chunk=args.class_chunk).to(device)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device, dtype=dtype).abs_()
    x.requires_grad_()
    targets = torch.randint(0, args.classes, (args.batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if args.impl == "loop":
                logits = reference_cssr_logits(x, head.encoders[0], head.decoders[0], sign=1, gamma=0.1)
            else:
                _, logits = head(x)
            loss = softmax_avg_loss(logits, targets)
        loss.backward()
        x.grad = None
        head.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Memory: the FIRST step of a fresh process, so nothing freed earlier sits in the
    # allocator's retained pages and hides the peak. Time: the steps after it.
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak_rss()
        base = _rss_bytes("VmRSS") or 0
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        peak_how = "cuda max_memory_allocated"
    else:
        hwm = _rss_bytes("VmHWM") if reset else None
        if hwm is None:  # ru_maxrss is KiB on Linux; includes anything before the step
            hwm, peak_how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
        else:
            peak_how = "VmHWM after clear_refs"
        peak = hwm - base
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    chunk = head.class_chunk
    if chunk is None and args.impl == "chunked":
        from cssr_dist.models.cssr_l1_function import default_class_chunk

        elem = 2 if dtype == torch.bfloat16 else 4
        chunk = default_class_chunk(args.classes, args.channels, args.batch * args.size**2, elem, device)
    return dict(
        impl=args.impl, classes=args.classes, channels=args.channels, batch=args.batch, size=args.size,
        latent=args.latent, device=args.device, dtype=args.dtype, threads=torch.get_num_threads(),
        chunk=chunk, first_s=first, times_s=times, median_s=statistics.median(times),
        peak_extra_bytes=peak, peak_how=peak_how,
    )


def parse_config(spec: str, default_batch: int) -> list[tuple[int, int, str, int]]:
    body, _, batch = spec.partition("@")
    shape, _, impls = body.partition(":")
    k, c = (int(v) for v in shape.lower().split("x"))
    names = impls.split(",") if impls else list(IMPLS)
    bad = [n for n in names if n not in IMPLS]
    if bad:
        raise SystemExit(f"error: unknown implementation {bad[0]!r} in {spec!r}; use {', '.join(IMPLS)}")
    return [(k, c, n, int(batch) if batch else default_batch) for n in names]


def run_one(args: argparse.Namespace, k: int, c: int, impl: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--classes", str(k), "--channels", str(c),
           "--batch", str(batch), "--size", str(args.size), "--latent", str(args.latent), "--device", args.device,
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.class_chunk:
        cmd += ["--class-chunk", str(args.class_chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return dict(impl=impl, classes=k, channels=c, batch=batch, error=f"rc={proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: list[dict]) -> str:
    lines = ["| K | C | batch | impl | chunk | median s | first s; timed s | peak extra MiB "
             "| vs loop: time | vs loop: memory |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    loops = {(r["classes"], r["channels"], r["batch"]): r for r in results if r["impl"] == "loop" and "error" not in r}
    for r in results:
        key = (r["classes"], r["channels"], r["batch"])
        if "error" in r:
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r['impl']} | | error: {r['error']} | | | | |")
            continue
        ref = loops.get(key)
        t_ratio = f"{r['median_s'] / ref['median_s']:.2f}x" if ref and r is not ref else ""
        m_ratio = f"{100 * r['peak_extra_bytes'] / ref['peak_extra_bytes']:.1f}%" if ref and r is not ref else ""
        times = f"{r['first_s']:.3f}; " + ", ".join(f"{t:.3f}" for t in r["times_s"])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r['impl']} | {r['chunk'] or ''} | {r['median_s']:.3f} | "
                     f"{times} | {r['peak_extra_bytes'] / 2**20:.0f} | {t_ratio} | {m_ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny size, seconds (CI smoke)")
    p.add_argument("--configs", nargs="*", help="KxC:impl,impl[@batch] (default: the CPU table)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=7, help="feature map side (7 for 224 px ResNets)")
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="timed steps after the first (memory) step")

    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core box a second OpenMP thread "
                        "that loses its core stalls every op for a time slice; 0 = torch's default)")
    p.add_argument("--class-chunk", type=int, default=None, help="override the chunk size")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--classes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--channels", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    specs = args.configs or (QUICK_CONFIGS if args.quick else CPU_DEFAULT_CONFIGS)
    jobs = [job for spec in specs for job in parse_config(spec, args.batch)]
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"device={args.device} dtype={args.dtype} size={args.size} latent={args.latent} repeats={args.repeats}",
          flush=True)
    results = []
    for k, c, impl, batch in jobs:
        results.append(run_one(args, k, c, impl, batch))
        r = results[-1]
        status = r.get("error") or f"{r['median_s']:.3f} s, peak +{r['peak_extra_bytes'] / 2**20:.0f} MiB"
        print(f"  K={k} C={c} B={batch} {impl}: {status}", file=sys.stderr, flush=True)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
