"""The open-set model: backbone feature map -> head -> ModelOutput(features, logits).

`features` are what the head scored (after its projection, if any): the PCSSR score and
the S1/S2 statistics are computed on them. With `freeze_backbone` (ImageNet fine-tuning)
the backbone stays in eval mode (BN statistics frozen) under `torch.no_grad`, and its
parameters do not require grad, so optimizers and DDP see only the head.
"""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple

import torch
from torch import nn

from cssr_dist.errors import ConfigError
from cssr_dist.models.backbones import build_backbone
from cssr_dist.models.cssr_head import DISTANCES, CSSRHead
from cssr_dist.models.linear_head import LinearHead

__all__ = ["HEADS", "ModelOutput", "OSRModel", "build_head", "build_model"]

HEADS = ("linear", "pcssr", "rcssr")


class ModelOutput(NamedTuple):
    features: torch.Tensor  # [B, C, H, W]
    logits: torch.Tensor  # [B, K, H, W]


class OSRModel(nn.Module):
    """Backbone + per-pixel head."""

    def __init__(self, backbone: nn.Module, head: nn.Module, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "OSRModel":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> ModelOutput:
        if self.freeze_backbone:
            with torch.no_grad():
                x = self.backbone(images)
        else:
            x = self.backbone(images)
        features, logits = self.head(x)
        return ModelOutput(features, logits)


def _choice(value: str, valid: tuple[str, ...], key: str) -> str:
    if value in valid:
        return value
    close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.0)
    raise ConfigError(f"{key}: unknown value {value!r}; did you mean {close[0]!r}? (valid: {', '.join(valid)})")


def build_head(cfg: Any, in_channels: int, num_classes: int) -> nn.Module:
    """Head from the model config section (see `build_model`)."""
    kind = _choice(cfg.head, HEADS, "model.head")
    projection = cfg.projection_dim or None
    if kind == "linear":
        gamma = 1.0 if cfg.gamma is None else cfg.gamma
        return LinearHead(in_channels, num_classes, gamma=gamma, projection_dim=projection)
    distance = _choice(str(cfg.distance).lower(), DISTANCES, "model.distance")
    if cfg.latent_dim is None or cfg.latent_dim <= 0:
        raise ConfigError(f"model.latent_dim must be a positive integer for {kind}, got {cfg.latent_dim!r}")
    return CSSRHead(
        in_channels,
        num_classes,
        latent=cfg.latent_dim,
        gamma=0.1 if cfg.gamma is None else cfg.gamma,
        sign=-1 if kind == "pcssr" else 1,
        distance=distance,
        hidden=tuple(cfg.hidden_layers or ()),
        projection_dim=projection,
        clamp=cfg.clamp,
        class_chunk=cfg.class_chunk,
    )


def build_model(cfg: Any, num_classes: int, in_chans: int) -> OSRModel:
    """OSRModel from `cfg` (the config's `model` section).

    Reads: backbone, pretrained, pretrained_file, head ('linear'|'pcssr'|'rcssr'),
    latent_dim, gamma (None -> 0.1 for CSSR, 1.0 for linear), distance ('l1'|'l2'),
    hidden_layers, projection_dim, clamp, freeze_backbone, class_chunk, sync_bn.
    """
    _choice(cfg.head, HEADS, "model.head")  # fail before building a big backbone
    backbone = build_backbone(cfg.backbone, cfg.pretrained, cfg.pretrained_file, in_chans=in_chans)
    head = build_head(cfg, backbone.num_features, num_classes)
    model = OSRModel(backbone, head, freeze_backbone=cfg.freeze_backbone)
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
