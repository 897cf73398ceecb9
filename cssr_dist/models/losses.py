"""Losses on per-pixel logit maps [B, K, H, W] (docs/method.md §2).

* softmax_avg (CSSR heads): pbar = mean_p softmax(z(p)); loss = -log pbar[y]. Computed in
  log space, log pbar = logsumexp_p log_softmax(z(p)) - log(HW), because the reference's
  log(mean(softmax)) underflows to -inf once a class's probability is ~0 at every pixel.
* avg_softmax (linear head): mean logits over pixels, then ordinary cross-entropy.

`class_log_probs` gives the pooled log-probabilities [B, K] that the loss, the
prediction (argmax) and the MSP score share, so the three never disagree.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_KINDS", "avg_softmax_loss", "build_loss", "class_log_probs", "class_probabilities", "loss_kind_for_head",
    "predicted_class", "softmax_avg_loss",
]

LOSS_KINDS = ("softmax_avg", "avg_softmax")
_HEAD_TO_LOSS = {"pcssr": "softmax_avg", "rcssr": "softmax_avg", "linear": "avg_softmax"}


def _log_pbar(logits: torch.Tensor) -> torch.Tensor:
    """log of the pixel-averaged softmax, [B, K], in float32 or wider."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    b, k = logits.shape[:2]
    log_p = F.log_softmax(logits.reshape(b, k, -1), dim=1)
    return torch.logsumexp(log_p, dim=2) - math.log(log_p.shape[2])


def _log_softmax_of_mean(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.log_softmax(logits.flatten(2).mean(2), dim=1)


def class_log_probs(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Pooled class log-probabilities [B, K] for `kind` in LOSS_KINDS."""
    if kind == "softmax_avg":
        return _log_pbar(logits)
    if kind == "avg_softmax":
        return _log_softmax_of_mean(logits)
    raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")


def class_probabilities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Pooled class probabilities [B, K] (pbar for softmax_avg, softmax of mean logits otherwise)."""
    return class_log_probs(logits, kind).exp()


def predicted_class(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Closed-set prediction [B] = argmax of the pooled probabilities (the loss's pooling)."""
    return class_log_probs(logits, kind).argmax(dim=1)


def softmax_avg_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-mean_b log pbar[b, y_b] with pbar the pixel-averaged softmax."""
    return F.nll_loss(_log_pbar(logits), targets)


def avg_softmax_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the pixel-averaged logits."""
    return F.nll_loss(_log_softmax_of_mean(logits), targets)


def loss_kind_for_head(head: str) -> str:
    """softmax_avg for the CSSR heads, avg_softmax for the linear head."""
    try:
        return _HEAD_TO_LOSS[head]
    except KeyError:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(_HEAD_TO_LOSS)}") from None


def build_loss(head: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss (logits [B,K,H,W], targets [B]) -> scalar for a head kind."""
    return softmax_avg_loss if loss_kind_for_head(head) == "softmax_avg" else avg_softmax_loss
