#!/usr/bin/env python
"""Benchmark the open-set metrics and ScoreStatistics.update_class_stats.

Targets (issue: metrics): all metrics for N=60,000 scores in < 1 s together; fast OSCR
>= 300x faster than the O(N^2) formulation at N=60,000. The O(N^2) formulation (one
threshold per score, counting known-correct and unknown samples above it with numpy, as
the CSSR/ARPL reference does) is timed on a subsample and extrapolated quadratically
(printed as such), because running it at N=60,000 takes minutes.

    python -m benchmarks.bench_metrics            # full sizes, prints a markdown table
    python -m benchmarks.bench_metrics --quick    # CI smoke run, seconds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import numpy as np
import torch

from cssr_dist.eval import metrics
from cssr_dist.scoring.statistics import ScoreStatistics, gram_matrix


def timeit(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls, seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def oscr_quadratic(known: np.ndarray, correct: np.ndarray, unknown: np.ndarray) -> float:
    """O(N^2) OSCR: for every score as threshold, O(N) counting (the reference's shape).

    Same curve as the fast one (>= threshold, (0,0) start), so the two values must agree.
    """
    pts = [(0.0, 0.0)]
    for t in np.sort(np.concatenate([known, unknown]))[::-1]:
        pts.append((np.sum(unknown >= t) / unknown.size, np.sum((known >= t) & correct) / known.size))
    pts.sort()
    f = np.array([p[0] for p in pts])
    c = np.array([p[1] for p in pts])
    return float(np.sum(np.diff(f) * (c[1:] + c[:-1]) / 2.0))


def make_data(n: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_known = n * 5 // 6
    labels = np.r_[rng.integers(0, num_classes, n_known), -np.ones(n - n_known, np.int64)]
    preds = np.where(rng.random(n) < 0.8, np.maximum(labels, 0), rng.integers(0, num_classes, n))
    scores = rng.normal(size=n) + 1.2 * (labels >= 0)
    scores = np.round(scores, 3)  # realistic ties (float32 softmax scores tie a lot)
    return scores, preds, labels


def bench_metrics(n: int, num_classes: int, repeat: int) -> dict[str, float]:
    scores, preds, labels = make_data(n, num_classes)
    known = labels >= 0
    k, u = scores[known], scores[~known]
    correct = preds[known] == labels[known]
    thr = metrics.threshold_at_tpr(k[: k.size // 5])
    fns = {
        "closed_set_accuracy": lambda: metrics.closed_set_accuracy(preds, labels),
        "auroc": lambda: metrics.auroc(k, u),
        "aupr_in": lambda: metrics.aupr_in(k, u),
        "aupr_out": lambda: metrics.aupr_out(k, u),
        "fpr_at_tpr": lambda: metrics.fpr_at_tpr(k, u),
        "oscr": lambda: metrics.oscr(k, correct, u),
        "threshold_at_tpr": lambda: metrics.threshold_at_tpr(k),
        "open_set_macro_f1": lambda: metrics.open_set_macro_f1(preds, labels, scores, thr, num_classes),
        "per_class_auroc (1 unknown class)": lambda: metrics.per_class_auroc(scores, labels, np.maximum(labels, 0)),
        "compute_metrics (all 7 keys)": lambda: metrics.compute_metrics(scores, preds, labels, num_classes, thr),
    }
    return {name: timeit(fn, repeat) for name, fn in fns.items()}


def bench_oscr(n: int, n_sub: int) -> dict[str, float]:
    scores, preds, labels = make_data(n, 10)
    known = labels >= 0
    k, u, correct = scores[known], scores[~known], preds[known] == labels[known]
    fast = timeit(lambda: metrics.oscr(k, correct, u), 5)
    # subsample keeps the known/unknown ratio
    rng = np.random.default_rng(1)
    idx = np.sort(rng.choice(n, n_sub, replace=False))
    ks, kn = known[idx], scores[idx]
    cs = (preds[idx] == labels[idx])[ks]
    t0 = time.perf_counter()
    slow_val = oscr_quadratic(kn[ks], cs, kn[~ks])
    slow_sub = time.perf_counter() - t0
    fast_val = metrics.oscr(kn[ks], cs, kn[~ks])
    assert abs(slow_val - fast_val) < 1e-9, (slow_val, fast_val)
    slow_full = slow_sub * (n / n_sub) ** 2
    return {"fast": fast, "slow_sub": slow_sub, "slow_full_extrapolated": slow_full, "speedup": slow_full / fast}


def bench_stats(k: int, c: int, hw: int, b: int, use_gram: bool, repeat: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(b, c, hw, hw, generator=g)
    preds = torch.randint(0, k, (b,), generator=g)
    st = ScoreStatistics(k, c, use_gram=use_gram)
    st.update_class_stats(feats, preds)  # warm-up
    fast = timeit(lambda: st.update_class_stats(feats, preds), repeat)

    # reference shape: Python loop over classes, boolean mask per class (host syncs)
    def loop() -> None:
        for cls in range(k):
            cond = preds == cls
            if not cond.any():
                continue
            sel = feats[cond]
            st.proto_sum[cls] += sel.abs().mean(dim=(2, 3), dtype=torch.float64).sum(0)
            st.proto_count[cls] += cond.sum()
            if use_gram:
                st.gram_sum[cls] += gram_matrix(sel).sum(0)
                st.gram_count[cls] += cond.sum()

    slow = timeit(loop, max(1, repeat // 2))
    return {"batched": fast, "per_class_loop": slow, "speedup": slow / fast}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run")
    ap.add_argument("--n", type=int, default=60_000, help="number of scores")
    ap.add_argument("--oscr-sub", type=int, default=0,
                    help="time the O(N^2) OSCR on this many samples and extrapolate (0: all N, no extrapolation)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, n_sub, repeat = (args.n, args.oscr_sub or args.n, 7) if not args.quick else (6_000, 1_000, 2)
    stat_sizes = [(1000, 512, 7, 64, False), (10, 256, 8, 64, True)]
    if args.quick:
        stat_sizes = [(100, 64, 7, 16, False), (10, 32, 8, 16, True)]

    print(f"# bench_metrics  python {platform.python_version()}  numpy {np.__version__}  torch {torch.__version__}")
    print(f"# machine: {platform.machine()} {platform.processor() or ''}  torch threads {torch.get_num_threads()}")
    print(f"\n## metrics, N={n} (5/6 known, K=1000), median of {repeat}\n")
    print("| function | ms |\n|---|---|")
    res = bench_metrics(n, 1000, repeat)
    indiv = sum(v for name, v in res.items() if not name.startswith("compute_metrics"))
    for name, v in res.items():
        print(f"| {name} | {v * 1e3:.2f} |")
    total = res["compute_metrics (all 7 keys)"]
    print(f"\nsum of individual calls {indiv * 1e3:.1f} ms; compute_metrics {total * 1e3:.1f} ms; "
          f"target < 1000 ms: {'MET' if indiv < 1.0 else 'NOT MET'}")

    o = bench_oscr(n, n_sub)
    print(f"\n## OSCR at N={n}\n")
    print(f"fast O(N log N): {o['fast'] * 1e3:.2f} ms")
    if n_sub == n:
        print(f"O(N^2) formulation: {o['slow_sub']:.2f} s measured at N={n} (not extrapolated)")
    else:
        print(f"O(N^2) formulation: {o['slow_sub']:.2f} s measured at N={n_sub}, "
              f"extrapolated x(N/{n_sub})^2 = {o['slow_full_extrapolated']:.1f} s at N={n} (EXTRAPOLATED)")
    print(f"speedup {o['speedup']:.0f}x; target >= 300x: {'MET' if o['speedup'] >= 300 else 'NOT MET'}")

    print("\n## ScoreStatistics.update_class_stats (CPU), median\n")
    print("| K | C | HxW | B | gram | batched ms | per-class loop ms | speedup |\n|---|---|---|---|---|---|---|---|")
    for k, c, hw, b, gram in stat_sizes:
        r = bench_stats(k, c, hw, b, gram, 5 if not args.quick else 2)
        print(f"| {k} | {c} | {hw}x{hw} | {b} | {gram} | {r['batched'] * 1e3:.2f} | "
              f"{r['per_class_loop'] * 1e3:.2f} | {r['speedup']:.1f}x |")


if __name__ == "__main__":
    main()
