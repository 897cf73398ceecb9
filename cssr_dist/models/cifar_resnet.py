"""CIFAR-style ResNet-18/34 (3x3 stem, stride 1, no max-pool), registered in timm.

CSSR's Tiny-ImageNet backbone: a 64 px image keeps its resolution through the stem, so
`forward_features` gives 512 x 8 x 8 (64 -> 64 -> 32 -> 16 -> 8). timm's own `resnet18`
(7x7 stride-2 stem + max-pool) would leave a 2 x 2 map, too coarse for per-pixel heads.

The defaults reproduce the CSSR reference's network (its `methods/resnet.py`, as its
Tiny-ImageNet configs build it: no projection): LeakyReLU with slope 0.01 after the stem BN
and between the two convolutions of every block, ReLU after the residual sum, and
PyTorch's default initialisation (no custom init). Both change the numbers a recipe gives.
``leaky_slope=0`` (ReLU everywhere) and ``init="kaiming_fan_out"`` (He-normal, fan-out,
torchvision's choice) give this project's earlier, torchvision-style network; pass them
through `timm.create_model(..., leaky_slope=0, init="kaiming_fan_out")` (timm drops None kwargs). Parameter
names are the same, so checkpoints load into either.
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .pooled_classifier import PooledClassifier

__all__ = ["CifarResNet"]


INITS = ("torch_default", "kaiming_fan_out")


def _inner_act(leaky_slope: float | None) -> nn.Module:
    return nn.ReLU(inplace=True) if not leaky_slope else nn.LeakyReLU(leaky_slope, inplace=True)


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-act-conv-BN + shortcut, then ReLU.

    ``act`` is LeakyReLU(0.01) in the reference (``leaky_slope``); the activation after the
    sum is a ReLU in both variants.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, leaky_slope: float | None = 0.01):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act = _inner_act(leaky_slope)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.out_act = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.out_act(out + shortcut)


class CifarResNet(PooledClassifier, nn.Module):
    """ResNet with a CIFAR stem; `forward_features` returns the layer4 map."""

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        leaky_slope: float | None = 0.01,
        init: str = "torch_default",
        **_: object,
    ):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = _inner_act(leaky_slope)
        widths, in_ch = (64, 128, 256, 512), 64
        for i, (width, depth) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_ch if j == 0 else width, width, stride if j == 0 else 1, leaky_slope)
                      for j in range(depth)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = width
        self._init_classifier(in_ch, num_classes, global_pool)
        if init == "kaiming_fan_out":  # torchvision's; the reference keeps PyTorch's default
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))



def _cfg(**kwargs: object) -> dict:
    cfg = dict(
        num_classes=200, input_size=(3, 64, 64), pool_size=(8, 8), crop_pct=1.0, interpolation="bilinear",
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), first_conv="conv1", classifier="fc",
    )
    cfg.update(kwargs)
    return cfg


default_cfgs = generate_default_cfgs({"cifar_resnet18": _cfg(), "cifar_resnet34": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs: object) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, **kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: object) -> CifarResNet:
    """CIFAR-stem ResNet-18 (CSSR's Tiny-ImageNet backbone): 64 px -> 512 x 8 x 8."""
    return _create("cifar_resnet18", pretrained, **dict(dict(layers=(2, 2, 2, 2)), **kwargs))


@register_model
def cifar_resnet34(pretrained: bool = False, **kwargs: object) -> CifarResNet:
    """CIFAR-stem ResNet-34: 64 px -> 512 x 8 x 8."""
    return _create("cifar_resnet34", pretrained, **dict(dict(layers=(3, 4, 6, 3)), **kwargs))
