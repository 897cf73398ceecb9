"""Recompute BatchNorm running statistics from training images before evaluation.

Why: the WRN backbones keep the reference's BN momentum 0.001, so after a short run their
running statistics are still far from the data and evaluation normalises with wrong
numbers (on a 20-epoch WRN-28-2 run, recomputing them lifted closed-set accuracy from 0.72
to 0.90 on the same weights). Evaluation-time BN should use the statistics of the data.

How, and why this way:

* Every BN layer normalises with its BATCH statistics during the pass (the regime the
  network was trained in, as ``torch.optim.swa_utils.update_bn``); only BN layers are put
  in training mode, so dropout stays off.
* Instead of averaging per-batch statistics (momentum ``None``), each layer's input
  moments are SUMMED exactly in float64 (count, sum, sum of squares, shifted by the old
  running mean for numerical stability), then summed over ranks with one
  ``accelerator.reduce``. The result is the exact mean and unbiased variance of each
  layer's input over all images of all ranks, whatever the batch sizes: averaging per-batch
  variances would miss the spread of the batch means, weight a short last batch like a
  full one, and leave each rank with different statistics.
* The pass runs on the unwrapped model: DDP would otherwise broadcast rank 0's buffers at
  every forward. All ranks end with identical statistics (the reduce is the same on all).
* Every rank centres on the SAME shift, rank 0's running means, sent to all ranks first:
  running statistics differ between ranks after DDP steps (DDP broadcasts buffers only at
  a forward), and sums centred on different shifts cannot be added.

Momenta are never changed (nothing to restore); every module's train/eval mode is restored.
SyncBatchNorm layers all-reduce their batch statistics at every forward, so with them every
rank must see the same number of batches (a padded sampler); plain BatchNorm has no such need.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["recalibrate_batchnorm", "batchnorm_layers"]


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BN layers that keep running statistics (the ones evaluation uses)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


def _first(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _common_shifts(layers: list[nn.modules.batchnorm._BatchNorm], accelerator: Any) -> list[torch.Tensor]:
    """Rank 0's running means in float64, on every rank (a broadcast written as a sum to which
    only rank 0 contributes, so it needs nothing but `accelerator.reduce`)."""
    shifts = [bn.running_mean.detach().double().clone() for bn in layers]
    if accelerator is None or accelerator.num_processes == 1:
        return shifts
    flat = torch.cat(shifts) * float(accelerator.process_index == 0)
    flat = accelerator.reduce(flat, reduction="sum")
    return list(flat.split([s.numel() for s in shifts]))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable, accelerator: Any = None, max_batches: int | None = None,
                          inputs: Callable[[Any], torch.Tensor] = _first) -> int:
    """Set every BN layer's running mean / unbiased variance to the exact moments of its input
    over the images of `loader` (this rank's share; all ranks' shares when `accelerator` is
    given: call it on every rank). Returns the number of images seen over all ranks.

    `loader` should yield TRAINING images with TEST transforms; `inputs(batch)` picks the
    images from a batch (default: its first element). `max_batches` caps batches per rank.
    """
    module = accelerator.unwrap_model(model) if accelerator is not None else model
    layers = batchnorm_layers(module)
    if not layers:
        return 0
    device = layers[0].running_mean.device
    shifts = _common_shifts(layers, accelerator)
    sums = [torch.zeros_like(s) for s in shifts]
    squares = [torch.zeros_like(s) for s in shifts]
    counts = torch.zeros(len(layers), dtype=torch.float64, device=device)

    def hook(index: int) -> Callable:
        def accumulate(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            dims = [d for d in range(x.dim()) if d != 1]  # every axis but channels
            centred = x - shifts[index].view(1, -1, *([1] * (x.dim() - 2)))
            sums[index] += centred.sum(dims)
            squares[index] += centred.square().sum(dims)
            counts[index] += x.numel() / x.shape[1]
        return accumulate

    modes = {m: m.training for m in module.modules()}
    tracked = [None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone() for bn in layers]
    handles = [bn.register_forward_pre_hook(hook(i)) for i, bn in enumerate(layers)]
    try:
        module.eval()
        for bn in layers:
            bn.train()  # batch statistics normalise the pass, as in training
        images_seen = 0
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = inputs(batch).to(device, non_blocking=True)
            images_seen += x.shape[0]
            module(x)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.train(training)
        for bn, count in zip(layers, tracked):
            if count is not None:
                bn.num_batches_tracked.copy_(count)
    flat = torch.cat([counts, *sums, *squares, torch.tensor([float(images_seen)], dtype=torch.float64, device=device)])
    if accelerator is not None:
        flat = accelerator.reduce(flat, reduction="sum")
    n_layers = len(layers)
    counts = flat[:n_layers]
    width = [s.numel() for s in shifts]
    offsets = torch.tensor([0, *width]).cumsum(0).tolist()
    for i, bn in enumerate(layers):
        n = counts[i].item()
        if n < 2:
            continue  # a layer no image reached keeps its statistics
        s1 = flat[n_layers + offsets[i]:n_layers + offsets[i + 1]]
        s2 = flat[n_layers + offsets[-1] + offsets[i]:n_layers + offsets[-1] + offsets[i + 1]]
        mean = shifts[i] + s1 / n
        var = (s2 - s1.square() / n).clamp_min(0) / (n - 1)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
    return int(flat[-1].item())
