"""Learning-rate schedules evaluated per iteration.

The paper's recipes are stated in epochs (milestones 120/190, one warm-up epoch) but the
reference sets the rate every iteration; a per-iteration lambda keeps that behaviour and
makes resume exact because the position is just the global step.

Two formulas (`schedule.formula`):

* ``project``: warm-up (s + 1) / W over the first W steps, multistep decay at the step where
  epoch = s / steps_per_epoch passes a milestone, cosine per step down to `min_lr`.
* ``reference`` (forced by `eval.protocol=reference`): the CSSR reference code's schedule
  as it computes it. Warm-up s / W (0 at step 0, the full rate at step W itself), milestones
  and cosine counted in whole epochs; the cosine is set once per epoch, from the end of
  warm-up to the first milestone, then restarts at each milestone with the rate x gamma,
  with pi written as 3.14159 and no floor.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import ScheduleConfig
from ..errors import ConfigError

#: The reference code's value of pi in its cosine (kept so its rates are reproduced exactly).
REFERENCE_PI = 3.14159


def lr_factor_fn(cfg: ScheduleConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Return f(step) -> multiplier of the base lr, for `torch.optim.lr_scheduler.LambdaLR`."""
    steps_per_epoch = max(1, steps_per_epoch)
    if cfg.formula == "reference":
        return _reference_factor_fn(cfg, steps_per_epoch)
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


def _cosine_cycles(cfg: ScheduleConfig) -> list[float]:
    """Cycle bounds of the reference's epoch-wise cosine: [warm-up end, milestones..., epochs]
    (a cycle that ends after the last epoch is cut there, as in the reference)."""
    starts = [cfg.warmup_epochs, *cfg.milestones]
    whole = all(float(b).is_integer() for b in starts)
    if not whole or any(b >= c for b, c in zip(starts, starts[1:])):
        raise ConfigError(f"the reference's cosine schedule (eval.protocol=reference) counts whole epochs: "
                          f"schedule.warmup_epochs ({cfg.warmup_epochs:g}) < schedule.milestones {cfg.milestones} "
                          "must be increasing whole numbers; set them so (e.g. schedule.warmup_epochs=1) or use "
                          "schedule.kind=multistep")
    return [*starts, cfg.epochs]


def _reference_factor_fn(cfg: ScheduleConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The reference code's lr / base lr at each step (see the module docstring)."""
    warmup = cfg.warmup_epochs * steps_per_epoch  # not rounded: the reference multiplies too
    cycles = _cosine_cycles(cfg) if cfg.kind == "cosine" else []

    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        if cfg.kind == "cosine" and epoch >= cycles[0]:
            k = max(i for i in range(len(cycles) - 1) if cycles[i] <= epoch)
            start, end = cycles[k], cycles[k + 1]
            return cfg.gamma ** k * (math.cos((epoch - start) / (end - start) * REFERENCE_PI) + 1) * 0.5
        if warmup > 0 and step <= warmup:
            return step / warmup
        if cfg.kind == "multistep":
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        return 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int):
    """A LambdaLR stepped once per optimizer step (its state_dict holds the step for resume)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(cfg, steps_per_epoch))
