"""Benchmark: CSSR head forward+backward: chunked, fused Triton kernel, per-class loop.

Compares, on one training step of the head alone (features -> logits -> softmax_avg loss
-> backward into the features and all head weights):

* chunked : `CSSRHead(distance='l1', l1_kernel='chunked')`: batched encoders + `chunked_l1_distance`;
* fused   : `CSSRHead(distance='l1', l1_kernel='triton')`: batched encoders + the fused
            Triton kernels of `cssr_l1_triton` (CUDA; on CPU the worker runs them in Triton's
            interpreter, TRITON_INTERPRET=1: a correctness rehearsal, its times mean nothing);
* loop    : the reference implementation's structure, a Python loop of per-class 1x1-conv
            auto-encoders (`reference_cssr_logits`), L1;
* l2      : `CSSRHead(distance='l2')`: the closed form (a different distance, shown beside).

Speed is also given as achieved TFLOP/s and as a fraction of a peak (--peak-tflops, default
989: H100/H200 SXM dense bf16). The FLOPs are the auto-encoders' own GEMMs, the same for
every implementation: forward encoder + decoder, backward two products each, i.e.
12 * K * L * C * N (N = batch * size^2); recomputation a path does on top is not counted.
Each result is also printed as one JSON line (and appended to --jsonl) when it is done.

Every configuration runs in its OWN subprocess so its peak memory is honest: on CPU the
process's resident-set high-water mark (VmHWM, reset after setup through
/proc/self/clear_refs; falls back to getrusage's ru_maxrss), minus the resident size
before the step; on CUDA `torch.cuda.max_memory_allocated` minus what was allocated before.
tracemalloc would not see torch's allocations.

    python -m benchmarks.bench_head --quick                       # seconds, CI smoke
    python -m benchmarks.bench_head --device cpu --tiny           # rehearsal of chunked/fused/loop, odd sizes (~1 min)
    python -m benchmarks.bench_head                               # the CPU table of docs/benchmarks/head.md
    python -m benchmarks.bench_head --device cuda --dtype bf16 --repeats 10 \
        --configs 1000x2048:chunked,fused,loop 1000x512:chunked,fused,loop   # issue 12 target 1

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
IMPLS = ("chunked", "fused", "loop", "l2")
H100_BF16_DENSE_TFLOPS = 989.0  # H100/H200 SXM, dense (no sparsity)

# The 2-core dev box (23 GB RAM, shared) cannot hold the loop at K=1000, B=64 (~20 GB), so
# the loop is compared at the largest K that fits; chunked and l2 also run at full scale.
CPU_DEFAULT_CONFIGS = (
    "250x512:chunked,loop,l2",
    "1000x512:chunked,l2",
    "60x2048:chunked,loop,l2",
    "1000x2048:chunked,l2",
)
QUICK_CONFIGS = ("20x64:chunked,loop,l2@8",)
# --tiny: every L1 path at odd sizes (C, N = batch * size^2 and latent not multiples of any
# tile), small enough for the Triton interpreter on a CPU.
TINY_CONFIGS = ("12x40:chunked,fused,loop@3",)
TINY_SIZE, TINY_LATENT = 3, 5


def model_flops(classes: int, channels: int, latent: int, pixels: int) -> int:
    """The auto-encoders' GEMM FLOPs of one forward+backward step (see the module docstring)."""
    return 12 * classes * latent * channels * pixels


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

    from cssr_dist.models import CSSRHead, reference_cssr_logits, softmax_avg_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    head = CSSRHead(args.channels, args.classes, latent=args.latent, gamma=0.1, sign=1,
                    distance="l2" if args.impl == "l2" else "l1", class_chunk=args.class_chunk,
                    l1_kernel="triton" if args.impl == "fused" else "chunked").to(device)
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

    def check_against_chunked() -> dict[str, float]:
        """Relative error of the fused path's logits and gradients against the chunked path's,
        on these inputs: on a GPU the only test of the compiled (not interpreted) kernels."""
        results = []
        for kernel in ("triton", "chunked"):
            head.l1_kernel = kernel
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                _, logits = head(x)
                loss = softmax_avg_loss(logits, targets)
            loss.backward()
            results.append([logits.detach().float(), x.grad.float(), head.encoders[0].grad.float(),
                            head.decoders[0].grad.float()])
            x.grad = None
            head.zero_grad(set_to_none=True)
        head.l1_kernel = "triton"
        return {name: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
                for name, a, b in zip(("logits", "grad_x", "grad_enc", "grad_dec"), *results)}

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
    median = statistics.median(times)
    check = check_against_chunked() if args.impl == "fused" else None
    flops = model_flops(args.classes, args.channels, args.latent, args.batch * args.size**2)
    return dict(
        kind="head_bench", impl=args.impl, classes=args.classes, channels=args.channels, batch=args.batch,
        size=args.size, latent=args.latent, device=args.device,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        dtype=args.dtype, threads=torch.get_num_threads(), interpreted=os.environ.get("TRITON_INTERPRET") == "1",
        chunk=chunk if args.impl == "chunked" else None, first_s=first, times_s=times, median_s=median,
        ms_per_step=1e3 * median, model_flops=flops, tflops=flops / median / 1e12, peak_tflops=args.peak_tflops,
        frac_peak=flops / median / 1e12 / args.peak_tflops, peak_extra_bytes=peak, peak_how=peak_how,
        rel_err_vs_chunked=check,
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
    cmd = [sys.executable, "-m", "benchmarks.bench_head", "--worker", "--impl", impl, "--classes", str(k), "--channels", str(c),
           "--batch", str(batch), "--size", str(args.size), "--latent", str(args.latent), "--device", args.device,
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--peak-tflops", str(args.peak_tflops)]
    if args.class_chunk:
        cmd += ["--class-chunk", str(args.class_chunk)]
    env = dict(os.environ)
    if impl == "fused" and args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # Triton has no CPU backend: run the kernels in its interpreter
    failed = dict(kind="head_bench", impl=impl, classes=k, channels=c, batch=batch, device=args.device,
                  dtype=args.dtype)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return failed | dict(error=f"timed out after {args.timeout_s} s")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return failed | dict(error=f"rc={proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speedups(results: list[dict]) -> list[dict]:
    """Time ratios between the implementations measured at the same size (e.g. fused vs chunked)."""
    rows = []
    done = [r for r in results if "error" not in r]
    for key in dict.fromkeys((r["classes"], r["channels"], r["batch"]) for r in done):
        at = {r["impl"]: r for r in done if (r["classes"], r["channels"], r["batch"]) == key}
        ratios = {f"{a}_speedup_over_{b}": at[b]["median_s"] / at[a]["median_s"]
                  for a, b in (("fused", "chunked"), ("fused", "loop"), ("chunked", "loop")) if a in at and b in at}
        if ratios:
            rows.append(dict(kind="head_bench_speedup", classes=key[0], channels=key[1], batch=key[2],
                             dtype=done[0]["dtype"], **ratios))
    return rows


def markdown(results: list[dict]) -> str:
    lines = ["| K | C | batch | impl | chunk | median s | first s; timed s | peak extra MiB "
             "| vs loop: time | vs loop: memory | TFLOP/s | of peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    loops = {(r["classes"], r["channels"], r["batch"]): r for r in results if r["impl"] == "loop" and "error" not in r}
    for r in results:
        key = (r["classes"], r["channels"], r["batch"])
        if "error" in r:
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r['impl']} | | error: {r['error']} | | | | | | |")
            continue
        ref = loops.get(key)
        t_ratio = f"{r['median_s'] / ref['median_s']:.2f}x" if ref and r is not ref else ""
        m_ratio = f"{100 * r['peak_extra_bytes'] / ref['peak_extra_bytes']:.1f}%" if ref and r is not ref else ""
        times = f"{r['first_s']:.3f}; " + ", ".join(f"{t:.3f}" for t in r["times_s"])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r['impl']} | {r['chunk'] or ''} | {r['median_s']:.3f} | "
                     f"{times} | {r['peak_extra_bytes'] / 2**20:.0f} | {t_ratio} | {m_ratio} | "
                     f"{r['tflops']:.3g} | {100 * r['frac_peak']:.2g}% |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny size, seconds (CI smoke)")
    p.add_argument("--tiny", action="store_true",
                   help=f"rehearsal: {' '.join(TINY_CONFIGS)}, {TINY_SIZE}x{TINY_SIZE}, latent {TINY_LATENT} "
                        "(fused runs in the Triton interpreter on CPU)")
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
    p.add_argument("--jsonl", type=Path, help="also append each result to this file as one JSON line")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="peak the achieved TFLOP/s is divided by (default: H100/H200 SXM dense bf16)")
    p.add_argument("--timeout-s", type=float, default=None, help="give up on one configuration after this long")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--classes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--channels", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.tiny:
        args.size, args.latent = TINY_SIZE, TINY_LATENT
    specs = args.configs or (TINY_CONFIGS if args.tiny else QUICK_CONFIGS if args.quick else CPU_DEFAULT_CONFIGS)
    jobs = [job for spec in specs for job in parse_config(spec, args.batch)]
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"device={args.device} dtype={args.dtype} size={args.size} latent={args.latent} repeats={args.repeats}",
          flush=True)
    results = []
    for k, c, impl, batch in jobs:
        results.append(run_one(args, k, c, impl, batch))
        r = results[-1]
        print(json.dumps(r), flush=True)
        if args.jsonl:
            with args.jsonl.open("a") as fh:
                fh.write(json.dumps(r) + "\n")
        status = r.get("error") or (f"{r['median_s']:.3f} s, peak +{r['peak_extra_bytes'] / 2**20:.0f} MiB, "
                                    f"{r['tflops']:.3g} TFLOP/s")
        print(f"  K={k} C={c} B={batch} {impl}: {status}", file=sys.stderr, flush=True)
    for row in speedups(results):
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with args.jsonl.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
