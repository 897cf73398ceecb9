"""Losses: softmax_avg (log space) and avg_softmax vs naive float64 formulas; stability."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cssr_dist.models import (
    avg_softmax_loss,
    build_loss,
    class_log_probs,
    class_probabilities,
    loss_kind_for_head,
    predicted_class,
    softmax_avg_loss,
)


def naive_pbar(logits: torch.Tensor) -> torch.Tensor:
    """mean over pixels of softmax over classes, the reference's formula."""
    b, k = logits.shape[:2]
    return torch.softmax(logits.double(), dim=1).reshape(b, k, -1).mean(2)


def test_softmax_avg_matches_naive_formula():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 4, 3, 3) * 3, torch.tensor([0, 3, 1, 2, 3])
    expected = -torch.log(naive_pbar(logits)[torch.arange(5), y]).mean()
    assert abs(softmax_avg_loss(logits, y).item() - expected.item()) < 1e-6
    assert torch.allclose(class_log_probs(logits, "softmax_avg").double(), naive_pbar(logits).log(), atol=1e-6)
    assert torch.allclose(class_probabilities(logits, "softmax_avg").sum(1), torch.ones(5))


def test_avg_softmax_matches_cross_entropy_of_mean_logits():
    torch.manual_seed(1)
    logits, y = torch.randn(5, 4, 2, 3).double(), torch.tensor([0, 3, 1, 2, 3])
    expected = F.cross_entropy(logits.mean((2, 3)), y)
    assert abs(avg_softmax_loss(logits, y).item() - expected.item()) < 1e-12
    assert torch.allclose(class_log_probs(logits, "avg_softmax"), F.log_softmax(logits.mean((2, 3)), 1))


def test_softmax_avg_is_finite_where_the_naive_formula_is_infinite():
    # Class 0 loses by 2000 at every pixel: naive log(mean softmax) = log(0) = -inf.
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 0] = -1000.0
    logits[:, 1] = 1000.0
    y = torch.tensor([0])
    assert torch.isinf(-torch.log(naive_pbar(logits)[0, 0]))
    logits.requires_grad_()
    loss = softmax_avg_loss(logits, y)
    assert abs(loss.item() - 2000.0) < 1e-2  # -log p0 = 2000 at every pixel, average of equal terms
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # d/dz0 of -log pbar0 = -1/HW per pixel (up to float32 rounding at |z| = 2000)
    assert torch.allclose(logits.grad[0, 0], torch.full((2, 2), -0.25), atol=1e-4)


def test_softmax_avg_pixel_average_mixes_pixels_in_probability_space():
    # One pixel votes strongly for class 1, three pixels are uniform: pbar is a probability mixture.
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 0] = 50.0
    pbar = class_probabilities(logits, "softmax_avg")[0]
    assert torch.allclose(pbar, torch.tensor([1.5 / 4, 2.5 / 4]), atol=1e-6)
    hw = 4
    assert abs(class_log_probs(logits, "softmax_avg")[0, 0].item() - math.log(1.5 / hw)) < 1e-6


def test_half_precision_logits_give_float32_log_probs():
    logits = (torch.randn(2, 3, 2, 2) * 30).bfloat16()
    for kind in ("softmax_avg", "avg_softmax"):
        assert class_log_probs(logits, kind).dtype == torch.float32


def test_predict_and_build_loss_follow_head_kind():
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 2] = 5.0
    logits[1, 1, 0, 0] = 9.0
    assert predicted_class(logits, "softmax_avg").tolist() == [2, 1]
    assert loss_kind_for_head("rcssr") == loss_kind_for_head("pcssr") == "softmax_avg"
    assert loss_kind_for_head("linear") == "avg_softmax"
    assert build_loss("pcssr") is softmax_avg_loss and build_loss("linear") is avg_softmax_loss
    with pytest.raises(ValueError, match="head"):
        build_loss("cssr")
    with pytest.raises(ValueError, match="loss kind"):
        class_log_probs(logits, "mean")
