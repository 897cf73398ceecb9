"""Optimizer construction following the paper's recipes (SGD, momentum 0 by default)."""

from __future__ import annotations

import torch

from ..config import OptimConfig
from ..errors import ConfigError
from ..protocol import base_lr  # the one lr-scaling rule, beside the recipe batch it scales by


def _fused_ok(params: list[torch.nn.Parameter]) -> bool:
    return bool(params) and all(p.device.type == "cuda" for p in params)


def build_optimizer(params, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    """Only trainable parameters are optimised: a frozen backbone (cssr_ft) has no optimizer
    state and no weight decay, so its weights stay bit-identical."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ConfigError("the model has no trainable parameters (frozen backbone and no head?); check model.freeze_backbone")
    lr = base_lr(cfg, global_batch)
    if cfg.name == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay, fused=_fused_ok(trainable) or None)
    return torch.optim.SGD(
        trainable,
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
        fused=_fused_ok(trainable) or None,
    )
