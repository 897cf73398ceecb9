#!/usr/bin/env python
"""Benchmark: fit and score time of every post-hoc detector (cssr_dist/scoring/posthoc.py)
on a trained run's model and data, beside the model's own forward passes.

One forward pass over the run's statistics images collects the bounded training sample
(eval.posthoc_fit_samples / posthoc_fit_maps, as the evaluation does); the first --batches
test batches are forwarded once and kept. Then, per detector, its fit on that sample and
its scoring of the kept batches are timed (best of --repeats; a detector's score time
excludes the pooling every detector shares, which the first row times with the default three
scores).

`--end-to-end N`: the figure the target is about. The run's best checkpoint is restored once
(as `train.py --test` restores it) and evaluated N times with eval.baselines=all and N times
with the default [msp,mls,energy], alternating (all, three, three, all, ...) in this one
process so that a shared machine's load falls on both alike; it prints each evaluation's
`eval_time_s` (the detectors' fit, every set: validation, test, each OOD set), the load
average beside each, and the medians and their ratio.

    python -m benchmarks.bench_posthoc --run runs/fashion_mnist_rcssr --batches 8
    python -m benchmarks.bench_posthoc --run runs/fashion_mnist_rcssr --end-to-end 3
    python -m benchmarks.bench_posthoc --run runs/fashion_mnist_rcssr --end-to-end 1 --without rankfeat,ash,scale
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from cssr_dist.apps.predict import restore_run
from cssr_dist.config import load_config
from cssr_dist.engine.build import build_model_and_scorer
from cssr_dist.engine.runner import Run
from cssr_dist.data.readers import build_run_data
from cssr_dist.distributed import gather_by_id
from cssr_dist.errors import CssrError, report
from cssr_dist.models.losses import class_log_probs, loss_kind_for_head
from cssr_dist.scoring import posthoc
from cssr_dist.scoring.scores import compute_scores, resolve_baselines


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def end_to_end(run_dir: Path, repeats: int, without: list[str]) -> int:
    """Evaluations of the restored run with eval.baselines=all (less `without`) and with the
    default three, alternating; medians and their ratio (the issue-18 target: <= 1.5)."""
    cfg = load_config(str(run_dir / "config.yaml"), ["eval.baselines=all", "tracking.wandb=false",
                                                      "run.progress=false", f"run.output_dir={run_dir.parent}",
                                                      f"run.name={run_dir.name}"])
    if without:
        cfg.eval.baselines = [n for n in resolve_baselines("all", cfg.model.head) if n not in without]
    run = Run(cfg, test_only=True)
    run.evaluator.on_evaluation = None  # no plots, no W&B: only the evaluation is timed
    run.load_best(posthoc_sample=True)
    stored = run.scorer.detectors.restored is not None
    run.model = run.accelerator.prepare(run.model)
    every = run.scorer
    _, three = build_model_and_scorer(cfg, run.data.meta.num_classes, run.accelerator.device, posthoc=False)
    three.stats = every.stats  # the restored statistics, shared
    print(f"run {run_dir}: scores with all: {len(every.baselines) + 1}, detectors {every.detectors.names}; "
          f"fit from the sample stored in best/: {stored}; torch threads {torch.get_num_threads()}")
    times: dict[str, list[float]] = {"all": [], "three": []}
    order = [("all", every), ("three", three), ("three", three), ("all", every)] * ((repeats + 1) // 2)
    for label, scorer in order[:2 * repeats]:
        run.evaluator.scorer = scorer
        load = os.getloadavg()[0]
        summary = run.evaluator.evaluate(run.model, fit=False)
        times[label].append(summary["eval_time_s"])
        print(f"{label:5s} eval_time_s {summary['eval_time_s']:7.1f}   load average {load:.1f} -> "
              f"{os.getloadavg()[0]:.1f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median: all {med['all']:.1f} s, three {med['three']:.1f} s, ratio {med['all'] / med['three']:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a trained run folder (best/ and config.yaml)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", type=int, default=8, help="test batches scored per detector")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--end-to-end", type=int, default=0, metavar="N",
                   help="instead: N evaluations with eval.baselines=all and N with the default three, alternating")
    p.add_argument("--without", default="", help="--end-to-end: detectors left out of all (comma-separated)")
    args = p.parse_args(argv)
    if args.end_to_end:
        try:
            return end_to_end(Path(args.run), args.end_to_end, [n for n in args.without.split(",") if n])
        except CssrError as err:
            return report(err)
    try:
        run = restore_run(args.run, args.device, threshold=0.0)
    except CssrError as err:
        return report(err)
    cfg, model, device = run.cfg, run.model, run.device
    head_kind = cfg.model.head
    loss_kind = loss_kind_for_head(head_kind)
    data = build_run_data(cfg.data, cfg.run.seed, device=device)
    names = [n for n in resolve_baselines("all", head_kind) if n in posthoc.DETECTORS]
    every = posthoc.PosthocDetectors(names, head_kind, run.scorer.stats.num_classes, run.scorer.stats.channels,
                                     cfg.eval.posthoc_fit_samples, cfg.eval.posthoc_fit_maps)
    sample = every.new_sample()
    start = time.perf_counter()
    n_train = 0
    with torch.no_grad():
        for images, labels, ids in data.train_eval:
            out = model(images.to(device))
            logits = out.logits.float()
            pooled = posthoc.Pooled(out.features.float(), logits, lambda: class_log_probs(logits, loss_kind))
            sample.add(pooled, labels.to(device), ids.to(device))
            n_train += len(labels)
        _sync(device)
        forward_train = time.perf_counter() - start
        rows, maps = sample.gathered(lambda local: gather_by_id(local, 1), device)
        kept, start = [], time.perf_counter()
        for i, (images, _, _) in enumerate(data.test):
            if i >= args.batches:
                break
            out = model(images.to(device))
            logits = out.logits.float()
            pooled = posthoc.Pooled(out.features.float(), logits, lambda: class_log_probs(logits, loss_kind))
            for kind in ("features", "logits", "posterior"):  # computed once here, shared by every detector
                pooled.of(kind)
            kept.append((out.features.float(), logits, pooled))
        _sync(device)
        forward_test = time.perf_counter() - start
    n_test = sum(len(f) for f, _, _ in kept)
    per10k = 10000.0 / max(1, n_test)
    print(f"run {args.run}: {head_kind} head, feature map {tuple(kept[0][0].shape[1:])}, device {device}; "
          f"sample {len(rows.get('ids', []))} rows, {len(maps.get('ids', []))} maps")
    print(f"forward: statistics pass {forward_train:.2f} s ({n_train} images); "
          f"test {forward_test * per10k:.2f} s per 10k images\n")
    print("| detector | pytorch-ood class | input | fit (s) | score (s per 10k images) |")
    print("|---|---|---|---|---|")
    base = _timed(lambda: [compute_scores(head_kind, f, z, names=["msp", "mls", "energy"]) for f, z, _ in kept],
                  device, args.repeats)
    print(f"| pred + msp + mls + energy (the default; also pools the inputs every detector shares) | MaxSoftmax, "
          f"MaxLogit, EnergyBased | posterior/logits | 0 | {base * per10k:.3f} |")
    for name in names:
        if name in posthoc.ALWAYS:
            continue
        spec = posthoc.DETECTORS[name]
        one = posthoc.PosthocDetectors([name], head_kind, every.num_classes, every.channels)
        with torch.no_grad():
            fit = _timed(lambda: one.fit(model.head, rows, maps), device, args.repeats)
            score = _timed(lambda: [one.score(name, pooled) for _, _, pooled in kept], device, args.repeats)
        print(f"| {name} | {spec.cls} | {spec.input} | {fit:.3f} | {score * per10k:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
