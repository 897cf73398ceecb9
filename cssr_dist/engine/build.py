"""The one factory from a config to a model and its scorer: training, `--test` and cssr-predict.

A run's model and its scorer must agree (K known classes, the head kind, the feature
channels the score statistics are sized by, the primary score); building both in one
place keeps a restored run (predict, --test) identical to the trained one.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import Config, ModelConfig
from ..models.osr_model import OSRModel, build_model
from ..scoring.scores import DEFAULT_BASELINES, Scorer, primary_score


def build_model_and_scorer(cfg: Config, num_classes: int, device: torch.device | str = "cpu",
                           model_cfg: ModelConfig | None = None,
                           posthoc: bool = True) -> tuple[OSRModel, Scorer]:
    """`cfg`'s model (or `model_cfg`'s: a restored run builds without pretrained weights) and scorer on `device`.

    `posthoc=False`: the scorer leaves out the post-hoc detectors of `eval.baselines` (they are
    fitted on training images at evaluation; a program that only applies the primary score,
    cssr-predict, has none to fit them on)."""
    model_cfg = cfg.model if model_cfg is None else model_cfg
    model: Any = build_model(model_cfg, num_classes, cfg.data.in_chans).to(device)
    if model_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    channels = model.feature_channels(cfg.data.in_chans, cfg.data.image_size)
    primary = primary_score(cfg.model.head, cfg.run.method, cfg.eval.score)
    baselines = cfg.eval.baselines if posthoc else DEFAULT_BASELINES
    scorer = Scorer(cfg.model.head, num_classes, channels, primary, baselines,
                    cfg.eval.posthoc_fit_samples, cfg.eval.posthoc_fit_maps)
    return model, scorer.to(device)


def weights_source(model_cfg: ModelConfig) -> str:
    """Where the backbone's starting weights come from, in words: a frozen-backbone checkpoint
    records it beside the hash of those weights, and a mismatch names both."""
    if model_cfg.pretrained_file:
        return f"model.pretrained_file {model_cfg.pretrained_file}"
    if model_cfg.pretrained:
        return f"timm's cached weights of {model_cfg.backbone}"
    return f"the seeded random init of {model_cfg.backbone} (model.pretrained=false)"
