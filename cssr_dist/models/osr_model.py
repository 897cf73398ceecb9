"""The open-set model: backbone feature map -> head -> ModelOutput(features, logits).

`features` are what the head scored (after its projection, if any): the PCSSR score and
the S1/S2 statistics are computed on them. With `freeze_backbone` (ImageNet fine-tuning)
the backbone stays in eval mode (BN statistics frozen) under `torch.no_grad`, and its
parameters do not require grad, so optimizers and DDP see only the head.

The CSSR logit is gamma x an L1 (or squared L2) error SUMMED over the C channels the
auto-encoders see, so its size grows with C: gamma 0.1 suits the paper's 512-channel
ResNet-18, but a 1280-channel EfficientNet or a 2048-channel ResNet-50 pushes most logits
to the clamp, where the gradient is zero and nothing is learnt. `model.gamma_reference_width`
(set in the fine-tuning configs) rescales gamma to gamma x width / C, i.e. the error
averaged over channels times the reference width: ResNet-18 (C = 512) keeps the paper's
numbers exactly. It is an option, not a default, because the from-scratch recipes were
tuned with plain gamma at their own C (osr_cnn: 128 channels, gamma 0.1) and must not
move. `check_logit_saturation` catches a scale that still does not suit, on the first
training batch, with one line instead of an epoch of chance accuracy.
"""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import ConfigError
from .backbones import build_backbone
from .cssr_head import DISTANCES, CSSRHead
from .linear_head import LinearHead

__all__ = ["HEADS", "ModelOutput", "OSRModel", "build_head", "build_model", "check_logit_saturation", "cssr_gamma"]

HEADS = ("linear", "pcssr", "rcssr")
SATURATION_LIMIT = 0.5  # "most logits": a healthy head starts with (almost) none at the clamp


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

    @torch.no_grad()
    def feature_channels(self, in_chans: int, image_size: int) -> int:
        """C of the feature map, measured with one dummy image (score statistics are sized by it)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        channels = int(self(torch.zeros(1, in_chans, image_size, image_size, device=device)).features.shape[1])
        self.train(was_training)
        return channels

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


def cssr_gamma(cfg: Any, width: int) -> float:
    """The CSSR logit scale for auto-encoders on `width` channels: gamma, or gamma x reference / width."""
    gamma = 0.1 if cfg.gamma is None else float(cfg.gamma)
    reference = getattr(cfg, "gamma_reference_width", None)
    return gamma * reference / width if reference else gamma


def check_logit_saturation(logits: torch.Tensor, head: nn.Module, where: str, limit: float = SATURATION_LIMIT) -> None:
    """Stop with one line when more than `limit` of `logits` sit at the head's clamp.

    Clamped logits have zero gradient, so such a run trains nothing while looking busy
    (closed-set accuracy at chance). Heads without a clamp (linear) pass. Pass the SAME
    tensor on every rank (e.g. gathered) so that all ranks decide alike.
    """
    clamp = getattr(head, "clamp", None)
    if not clamp or clamp <= 0 or logits.numel() == 0:
        return
    fraction = float((logits.detach().abs().float() >= clamp * (1 - 1e-3)).float().mean())
    if fraction <= limit:
        return
    width, scale = getattr(head, "feature_dim", "?"), abs(getattr(head, "scale", float("nan")))
    raise ConfigError(
        f"{fraction:.0%} of the logits of {where} sit at the clamp {clamp:g}: the logit scale {scale:.3g} does not "
        f"suit the feature width C={width}; set model.gamma_reference_width=512 (gamma x 512/C) or lower model.gamma"
    )


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
        gamma=cssr_gamma(cfg, projection or in_channels),
        sign=-1 if kind == "pcssr" else 1,
        distance=distance,
        hidden=tuple(cfg.hidden_layers or ()),
        projection_dim=projection,
        clamp=cfg.clamp,
        class_chunk=cfg.class_chunk, l1_kernel=cfg.l1_kernel,
    )


def build_model(cfg: Any, num_classes: int, in_chans: int) -> OSRModel:
    """OSRModel from `cfg` (the config's `model` section).

    Reads: backbone, pretrained, pretrained_file, head ('linear'|'pcssr'|'rcssr'),
    latent_dim, gamma (None -> 0.1 for CSSR, 1.0 for linear), gamma_reference_width
    (CSSR: gamma x width / C), distance ('l1'|'l2'),
    hidden_layers, projection_dim, clamp, freeze_backbone, class_chunk, sync_bn.
    """
    _choice(cfg.head, HEADS, "model.head")  # fail before building a big backbone
    backbone = build_backbone(cfg.backbone, cfg.pretrained, cfg.pretrained_file, in_chans=in_chans)
    head = build_head(cfg, backbone.num_features, num_classes)
    model = OSRModel(backbone, head, freeze_backbone=cfg.freeze_backbone)
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


# `model.compile_mode: auto` picks CUDA graphs (reduce-overhead) for inputs up to this size.
# Measured on an H200 (2026-12-04, docs/benchmarks.md): WRN-40-4 at 32 px, batch 128, bf16
# ran 23,075 img/s with reduce-overhead against 6,764 with the default mode and 6,950 eager:
# small images make launch-bound steps, which CUDA graphs remove; 224 px steps are
# compute-bound and keep the default mode.
SMALL_IMAGE_PX = 64


def resolve_compile_mode(mode: str, image_size: int | None) -> str:
    """The torch.compile mode for `model.compile_mode` at this input size (`auto` decides by size)."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if image_size is not None and image_size <= SMALL_IMAGE_PX else "default"


def compile_or_eager(model: nn.Module, mode: str = "default") -> nn.Module:
    """torch.compile (model.compile_mode; reduce-overhead = CUDA graphs) with a silent fallback
    to eager where a graph fails (e.g. no compiler)."""
    try:
        import torch._dynamo  # start-up time: dynamo loads only for model.compile=true

        torch._dynamo.config.suppress_errors = True
        return torch.compile(model, mode=mode)
    except Exception as err:  # noqa: BLE001 - any backend failure means: run eagerly
        print(f"warning: torch.compile unavailable ({type(err).__name__}); running eagerly")
        return model
