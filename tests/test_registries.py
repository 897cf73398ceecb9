"""Every registered component, tested by name: a backbone, head or score added to its registry
is built and exercised here without new test code (timm's tests/test_models.py idea).

Tiny inputs (batch 2 of 16 x 16): the point is that each entry builds through the one factory
(engine/build.py), runs forward and backward with every head, and every score fits and scores.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cssr_dist.config import Config
from cssr_dist.engine.build import build_model_and_scorer
from cssr_dist.models.backbones import PROJECT_BACKBONES
from cssr_dist.models.losses import build_loss
from cssr_dist.models.osr_model import HEADS
from cssr_dist.scoring.scores import SCORE_REGISTRY, Scorer

K = 3


def tiny_config(backbone: str = "osr_cnn", head: str = "rcssr") -> Config:
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, backbone=backbone, head=head, latent_dim=4, pretrained=False)
    cfg.data = dataclasses.replace(cfg.data, image_size=16, in_chans=3, mean=[0.5] * 3, std=[0.25] * 3)
    return cfg


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backbone", PROJECT_BACKBONES)
def test_every_backbone_with_every_head_trains_a_step(backbone, head):
    torch.manual_seed(0)
    cfg = tiny_config(backbone, head)
    model, scorer = build_model_and_scorer(cfg, K)
    model.train()
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    out = model(images)
    assert out.features.ndim == 4 and out.features.shape[:2] == (2, scorer.stats.channels)
    assert out.logits.shape[:2] == (2, K) and out.logits.shape[2:] == out.features.shape[2:]
    loss = build_loss(head)(out.logits, labels)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("score", sorted(SCORE_REGISTRY))
def test_every_score_fits_and_scores(score, head):
    torch.manual_seed(1)
    model, _ = build_model_and_scorer(tiny_config("osr_cnn", head), K)
    model.eval()
    with torch.no_grad():
        outputs = [tuple(model(torch.randn(4, 3, 16, 16))) for _ in range(3)]
    scorer = Scorer(head, K, outputs[0][0].shape[1], score)
    scorer.fit(lambda: outputs, lambda t: t)
    scores = scorer(*outputs[0])
    assert scores["pred"].shape == (4,) and int(scores["pred"].max()) < K
    assert scores[score].shape == (4,) and torch.isfinite(scores[score]).all(), score
