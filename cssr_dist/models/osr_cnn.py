"""A small CNN for 28 x 28 grey images (MNIST family), registered in timm as `osr_cnn`.

It is the backbone of the default experiment, which must train a few epochs on ~30k
images in minutes on a 2-core CPU. So: six 3x3 conv + BN + LeakyReLU layers, and the
resolution is halved early (28 -> 14 -> 7) so the wider layers run on small maps; the
output is a 128 x 7 x 7 map (49 pixels for the per-pixel heads). Measured on the 2-core
dev CPU: forward + backward of the backbone alone, batch 128, 2 threads, lighter load:
0.14 s (widths 32-64-64-128-128-128: 0.20 s; 64-64-128-128-128-128: 0.32 s); a full SGD
step with an RCSSR head (K=6, latent 64), 1 thread, machine shared (load ~4.6): 0.23 s,
i.e. ~55 s per 30k images.
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .pooled_classifier import PooledClassifier

__all__ = ["OsrCnn"]


def _conv_bn_act(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.LeakyReLU(0.1, inplace=True),
    )


class OsrCnn(PooledClassifier, nn.Module):
    """conv(32) -> conv(32, /2) -> conv(64) -> conv(64, /2) -> conv(128) -> conv(128)."""

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 32, 64, 64, 128, 128),
        strides: tuple[int, ...] = (1, 2, 1, 2, 1, 1),
        num_classes: int = 10,
        in_chans: int = 1,
        global_pool: str = "avg",
        **_: object,
    ):
        super().__init__()
        layers, in_ch = [], in_chans
        for width, stride in zip(widths, strides):
            layers.append(_conv_bn_act(in_ch, width, stride))
            in_ch = width
        self.features = nn.Sequential(*layers)
        self._init_classifier(in_ch, num_classes, global_pool)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)



default_cfgs = generate_default_cfgs({
    "osr_cnn": dict(
        num_classes=10, input_size=(1, 28, 28), pool_size=(7, 7), crop_pct=1.0, interpolation="bilinear",
        mean=(0.5,), std=(0.25,), first_conv="features.0.0", classifier="fc",
    ),
})


@register_model
def osr_cnn(pretrained: bool = False, **kwargs: object) -> OsrCnn:
    """Small fast CNN for 28 px grey images: 28 px -> 128 x 7 x 7."""
    return build_model_with_cfg(OsrCnn, "osr_cnn", pretrained, **kwargs)
