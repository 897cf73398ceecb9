"""Learning-rate schedules evaluated per iteration.

The paper's recipes are stated in epochs (milestones 120/190, one warm-up epoch) but the
reference sets the rate every iteration; a per-iteration lambda keeps that behaviour and
makes resume exact because the position is just the global step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import ScheduleConfig


def lr_factor_fn(cfg: ScheduleConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Return f(step) -> multiplier of the base lr, for `torch.optim.lr_scheduler.LambdaLR`."""
    steps_per_epoch = max(1, steps_per_epoch)
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    total_steps = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        epoch = step / steps_per_epoch
        if cfg.kind == "multistep":
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        if cfg.kind == "cosine":
            span = max(1, total_steps - warmup_steps)
            t = min(1.0, (step - warmup_steps) / span)
            floor = cfg.min_lr
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int):
    """A LambdaLR stepped once per optimizer step (its state_dict holds the step for resume)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(cfg, steps_per_epoch))
