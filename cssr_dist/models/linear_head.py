"""Linear baseline head: a per-pixel 1x1 conv C -> K without bias, times gamma.

Every head returns `(features, logits)`: the features it actually scored (after the
optional projection) and the per-pixel logit map. Pooling happens in the loss and scores.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LinearHead", "projection_block"]


def projection_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv (no bias) + BN + LeakyReLU, as the reference's fine-tuning projection."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(inplace=True),
    )


class LinearHead(nn.Module):
    """z_k(p) = gamma * w_k . x_p  (optionally on projected features)."""

    def __init__(self, in_channels: int, num_classes: int, gamma: float = 1.0, projection_dim: int | None = None):
        super().__init__()
        self.projection = projection_block(in_channels, projection_dim) if projection_dim else nn.Identity()
        self.feature_dim = projection_dim or in_channels
        self.num_classes = num_classes
        self.gamma = float(gamma)
        self.classifier = nn.Conv2d(self.feature_dim, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.projection(x)
        return features, self.logits_from_features(features)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The logit map of already projected features (post-hoc detectors that modify them)."""
        logits = self.classifier(features)
        return logits * self.gamma if self.gamma != 1.0 else logits
