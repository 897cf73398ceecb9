"""The timm classifier interface shared by our backbones (WRN, CIFAR ResNet, osr_cnn).

timm's factory, `reset_classifier` and `forward_head(pre_logits=True)` expect these
methods; the open-set heads only use `forward_features`, but keeping the interface lets
the backbones serve as ordinary timm classifiers too.
"""

from __future__ import annotations

import torch
from torch import nn


class PooledClassifier:
    """Mixin for nn.Modules with `forward_features -> [B, C, H, W]` and a linear `fc`."""

    num_features: int
    num_classes: int
    global_pool: str
    fc: nn.Module

    def _init_classifier(self, num_features: int, num_classes: int, global_pool: str) -> None:
        self.num_features = num_features
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self._init_classifier(self.num_features, num_classes, self.global_pool if global_pool is None else global_pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
