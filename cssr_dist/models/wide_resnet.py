"""WideResNet as used by FixMatch and by CSSR on CIFAR-10 / SVHN, registered in timm.

Same function as the FixMatch reference: pre-activation blocks, BatchNorm momentum 0.001,
LeakyReLU(0.1), a final BN + LeakyReLU, and NO global pooling inside `forward_features`
(CSSR heads work per pixel). `wrn40_4` maps a 32 px image to 256 x 8 x 8.

One deliberate difference in *parameters*, not in function: in the reference, the first
block of stages 2 and 3 computes `relu(bn1(x))` and then throws it away (the conv and the
shortcut both read the raw `x`). Those BN layers never receive a gradient, which makes
DistributedDataParallel fail with "unused parameters". We compute exactly the same
function but do not create the dead BN layer.
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .pooled_classifier import PooledClassifier

__all__ = ["WideResNet"]

_BN_MOMENTUM = 0.001
_SLOPE = 0.1


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=_BN_MOMENTUM)


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(_SLOPE, inplace=True)


class WideBasicBlock(nn.Module):
    """Pre-activation residual block (BN-LReLU-conv3x3-BN-LReLU-conv3x3)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_rate: float, activate_before_residual: bool):
        super().__init__()
        self.equal_in_out = in_ch == out_ch and stride == 1
        self.activate_before_residual = activate_before_residual
        # The reference discards bn1(x) when the block changes width without
        # activate_before_residual; do not create a parameter that is never used.
        self.pre_activation = self.equal_in_out or activate_before_residual
        if self.pre_activation:
            self.bn1 = _bn(in_ch)
            self.act1 = _act()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = _bn(out_ch)
        self.act2 = _act()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equal_in_out:
            out = self.act1(self.bn1(x))
            residual = x
        else:
            if self.activate_before_residual:
                x = self.act1(self.bn1(x))
            out = x
            residual = self.shortcut(x)
        out = self.act2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = nn.functional.dropout(out, p=self.drop_rate, training=self.training)
        return residual + self.conv2(out)


class WideResNet(PooledClassifier, nn.Module):
    """WRN-depth-widen (FixMatch variant); `forward_features` returns the last feature map."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 2,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **_: object,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.block1 = self._stage(n, widths[0], widths[1], 1, drop_rate, activate_before_residual=True)
        self.block2 = self._stage(n, widths[1], widths[2], 2, drop_rate, activate_before_residual=False)
        self.block3 = self._stage(n, widths[2], widths[3], 2, drop_rate, activate_before_residual=False)
        self.bn1 = _bn(widths[3])
        self.act = _act()
        self._init_classifier(widths[3], num_classes, global_pool)
        self._init_weights()

    @staticmethod
    def _stage(
        n: int, in_ch: int, out_ch: int, stride: int, drop: float, activate_before_residual: bool
    ) -> nn.Sequential:
        blocks = [
            WideBasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, drop, activate_before_residual)
            for i in range(n)
        ]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        return self.act(self.bn1(x))



def _cfg(**kwargs: object) -> dict:
    cfg = dict(
        num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, interpolation="bilinear",
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), first_conv="conv1", classifier="fc",
    )
    cfg.update(kwargs)
    return cfg


default_cfgs = generate_default_cfgs({"wrn40_4": _cfg(), "wrn28_2": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs: object) -> WideResNet:
    return build_model_with_cfg(WideResNet, variant, pretrained, **kwargs)


@register_model
def wrn40_4(pretrained: bool = False, **kwargs: object) -> WideResNet:
    """WRN-40-4 (CSSR's CIFAR-10 / SVHN backbone): 32 px -> 256 x 8 x 8."""
    return _create("wrn40_4", pretrained, **dict(dict(depth=40, widen_factor=4), **kwargs))


@register_model
def wrn28_2(pretrained: bool = False, **kwargs: object) -> WideResNet:
    """WRN-28-2 (FixMatch's CIFAR-10 backbone): 32 px -> 128 x 8 x 8."""
    return _create("wrn28_2", pretrained, **dict(dict(depth=28, widen_factor=2), **kwargs))
